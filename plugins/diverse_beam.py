"""Diverse Beam Search, from "Diverse Beam Search: Decoding Diverse Solutions from Neural Sequence Models" (arXiv:1610.02424).

The beams are split into ``num_beam_groups`` groups of equal size. At every step
all beams run through the model in one forward; then the groups choose their
next tokens in order, group ``g`` subtracting ``diversity_penalty × n(t)`` from
its log-probabilities, where ``n(t)`` counts how many beams of the groups before
it chose token ``t`` at this step (Hamming diversity). Each group is a beam
search of its own with its own finished hypotheses; the final sequences are the
best of all groups' hypotheses.

transformers ran this as ``generate(num_beam_groups=...)`` up to 4.56 and
removed it (4.57: core; 5.0: helpers). This module keeps transformers 4.55's
group beam search semantics exactly — initial scores, top ``2 × group_size``
candidates, EOS handling, per-group early stopping, finalisation and ranking —
and runs inside transformers 5's ``generate`` through ``custom_generate``, so
the generation config, logits processors, stopping criteria and the ``Cache``
(reordered through ``Cache.reorder_cache``) are transformers' own. Decoder-only
and encoder-decoder models are supported.

Reproduced claims (docs/benchmarks.md, "Diverse beam search"): identical
sequences to transformers 4.55.4's group beam search, and its speed.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from decodekit import compat
from decodekit.errors import AttachError, ConfigError
from decodekit.hookspecs import hookimpl
from decodekit.strategy import Params, Strategy
from pydantic import Field

# generate() keyword arguments that the params may fill in when the call does not give them
_GENERATE_KWARGS = (
    "num_beams",
    "max_new_tokens",
    "length_penalty",
    "early_stopping",
    "num_return_sequences",
    "do_sample",
)
# generate() keyword arguments that only the params set: a different value in the call is an error
_OWN_KWARGS = ("num_beam_groups", "diversity_penalty")


class DiverseBeamParams(Params):
    """Parameters of `diverse-beam`.

    ``num_beams``, ``max_new_tokens``, ``length_penalty``, ``early_stopping``,
    ``num_return_sequences`` and ``do_sample`` are ordinary ``generate`` arguments:
    pass them to ``generate`` as usual, or set them here (None: take them from the
    call / generation config). A value set here and a different one in the call is an error.
    ``generate(num_beam_groups=..., diversity_penalty=...)`` while the strategy is
    attached must equal ``num_beam_groups`` and ``diversity_penalty`` here (the
    params decide them); a different value is an error naming both.
    """

    num_beam_groups: int = Field(
        2,
        ge=1,
        description="Number of groups the beams are split into (num_beams must divide by it).",
    )
    diversity_penalty: float = Field(
        0.5,
        ge=0.0,
        description="Hamming penalty: subtracted from a token's log-probability once per beam of an "
        "earlier group that chose it at this step (paper: 0.5; 0 gives independent beam searches).",
    )
    num_beams: int | None = Field(
        None, ge=1, description="Total beams over all groups (generate's num_beams)."
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate (generate's max_new_tokens)."
    )
    length_penalty: float | None = Field(
        None,
        description="Finished hypotheses are ranked by sum log-prob / length**length_penalty "
        "(generate's length_penalty; transformers' default 1.0).",
    )
    early_stopping: bool | Literal["never"] | None = Field(
        None,
        description="When a group stops: True once it has group_size finished hypotheses; False "
        "(default) by the heuristic of transformers; 'never' only when no better one is possible.",
    )
    num_return_sequences: int | None = Field(
        None, ge=1, description="Sequences returned per input, best first (at most num_beams)."
    )
    do_sample: bool | None = Field(
        None,
        description="Sample each group's candidates (without replacement, from the softmax of the "
        "accumulated scores after temperature/top-k/top-p) instead of taking the top ones.",
    )


class _GroupHypotheses:
    """The finished hypotheses of one (input, group): at most ``size``, the best by normalised score.

    Mirrors transformers 4.55's ``BeamHypotheses`` (same order of insertion and
    eviction, same `is_done` rules), so that ties resolve the same way.
    """

    def __init__(
        self, size: int, length_penalty: float, early_stopping: bool | str, max_length: int
    ):
        self.size = size
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.max_length = max_length
        self.beams: list[tuple[float, torch.Tensor, torch.Tensor | None]] = []
        self.worst_score = 1e9

    def add(
        self, hyp: torch.Tensor, sum_logprobs: float, generated_len: int, beam_index=None
    ) -> None:
        score = sum_logprobs / (generated_len**self.length_penalty)
        if len(self.beams) < self.size or score > self.worst_score:
            self.beams.append((score, hyp, beam_index))
            if len(self.beams) > self.size:
                ranked = sorted((s, i) for i, (s, _, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int, prompt_len: int) -> bool:
        if len(self.beams) < self.size:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best = best_sum_logprobs / (self.max_length - prompt_len) ** self.length_penalty
        else:
            best = best_sum_logprobs / (cur_len - prompt_len) ** self.length_penalty
        return self.worst_score >= best


def _cache_key(model_kwargs: dict[str, Any]) -> str | None:
    """The key under which generate keeps the cache (``cache`` in transformers 5.24, formerly ``past_key_values``)."""
    for key in ("cache", "past_key_values", "cache_params"):
        if model_kwargs.get(key) is not None:
            return key
    return None


def reorder_model_cache(model: Any, model_kwargs: dict[str, Any], rows: torch.Tensor) -> None:
    """Reorder the cache in ``model_kwargs`` so that row ``i`` becomes old row ``rows[i]`` (Cache API)."""
    key = _cache_key(model_kwargs)
    if key is None:
        return
    cache = model_kwargs[key]
    legacy_reorder = compat.legacy_reorder_cache(model)
    if legacy_reorder is not None:
        model_kwargs[key] = legacy_reorder(cache, rows)
    elif hasattr(cache, "reorder_cache"):
        cache.reorder_cache(rows)
    else:
        raise AttachError(
            f"{type(model).__name__} uses a {type(cache).__name__}, which cannot reorder its rows, so "
            "beams cannot be selected; pass use_cache=False to generate, or use a model whose cache "
            "implements reorder_cache."
        )


def _output_class(model: Any):
    from transformers.generation.utils import (
        GenerateBeamDecoderOnlyOutput,
        GenerateBeamEncoderDecoderOutput,
    )

    if model.config.is_encoder_decoder:
        return GenerateBeamEncoderDecoderOutput
    return GenerateBeamDecoderOnlyOutput


_PRE_DIVERSITY = ("ClassifierFreeGuidanceLogitsProcessor", "SequenceBiasLogitsProcessor")


def split_processors(logits_processor) -> tuple[list, list]:
    """Split the processors where transformers ≤4.56 placed the Hamming diversity processor.

    It came after classifier-free guidance and sequence bias and before every other
    processor (repetition penalty, min length, user processors, sampling warpers).
    """
    procs = list(logits_processor or [])
    i = 0
    while i < len(procs) and type(procs[i]).__name__ in _PRE_DIVERSITY:
        i += 1
    return procs[:i], procs[i:]


class DiverseBeam(Strategy):
    """Group beam search with Hamming diversity between groups, run inside ``generate``."""

    name = "diverse-beam"
    loops = ("token-autoregression",)
    Params = DiverseBeamParams
    slot = "selector"
    paper = "Diverse Beam Search: Decoding Diverse Solutions from Neural Sequence Models, arXiv:1610.02424"

    def on_attach(self, run) -> None:
        self.reset(run)  # stats() reads zeros before the first call

    def reset(self, run) -> None:
        self.steps = 0
        self.groups_finished_early = 0

    def stats(self) -> dict[str, Any]:
        return {"steps": self.steps, "groups_finished_early": self.groups_finished_early}

    @hookimpl
    def decodekit_call_start(self, run, call_kwargs):
        p = self.params
        for key in _GENERATE_KWARGS:
            value = getattr(p, key)
            if value is None:
                continue
            given = call_kwargs.get(key)
            if given is not None and given != value:
                raise ConfigError(
                    f"strategies.{self.name}.params.{key}",
                    f"set to {value!r} here but generate() was called with {key}={given!r}; "
                    "give it in one place only.",
                )
            call_kwargs[key] = value
        # transformers' own group beam search arguments: the strategy's params decide them
        for key in _OWN_KWARGS:
            if key not in call_kwargs:
                continue
            given, value = call_kwargs.pop(key), getattr(p, key)
            if given is not None and given != value:
                raise ConfigError(
                    f"strategies.{self.name}.params.{key}",
                    f"set to {value!r} here but generate() was called with {key}={given!r}; "
                    "with diverse-beam attached the params decide it: change the params "
                    "(or drop the argument from the call).",
                )

    # -- the loop --------------------------------------------------------------------
    @hookimpl
    def decodekit_generate(
        self,
        run,
        model,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        model_kwargs,
    ):
        return self.group_beam_search(
            model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs
        )

    def _check(self, cfg, batch_beams: int) -> tuple[int, int, int]:
        groups = self.params.num_beam_groups
        beams = cfg.num_beams
        where = f"strategies.{self.name}.params"
        if beams < 2:
            raise ConfigError(
                f"{where}.num_beams",
                f"diverse beam search needs num_beams >= 2 (got {beams}); pass num_beams to "
                "generate() or set it in the params.",
            )
        if groups > beams or beams % groups:
            raise ConfigError(
                f"{where}.num_beam_groups",
                f"num_beams ({beams}) must be a multiple of num_beam_groups ({groups}); change one.",
            )
        if cfg.num_return_sequences > beams:
            raise ConfigError(
                f"{where}.num_return_sequences",
                f"num_return_sequences ({cfg.num_return_sequences}) cannot exceed num_beams ({beams}).",
            )
        if batch_beams % beams:
            raise ConfigError(
                where,
                f"generate passed {batch_beams} rows, not a multiple of num_beams ({beams}).",
            )
        return beams, groups, beams // groups

    def group_beam_search(
        self,
        model,
        input_ids: torch.LongTensor,
        logits_processor,
        stopping_criteria,
        cfg,
        model_kwargs: dict[str, Any],
    ):
        """transformers 4.55's ``_group_beam_search``, on transformers 5's generate set-up."""
        beams, groups, size = self._check(cfg, input_ids.shape[0])
        search = _GroupBeamSearch(
            cfg, input_ids, groups, size, self.params.diversity_penalty, logits_processor
        )
        use_cache = model_kwargs.get("use_cache", True)
        outputs = compat.prefill(model, input_ids, cfg, model_kwargs)
        while True:
            model_kwargs = compat.update_model_kwargs(
                model, outputs, model_kwargs, is_encoder_decoder=model.config.is_encoder_decoder
            )
            raw = outputs.logits[:, -1, :].to(
                dtype=torch.float32, device=search.device
            )  # (batch*beams, V)
            del outputs
            self.groups_finished_early += search.step(raw)
            reorder_model_cache(model, model_kwargs, search.reorder)
            self.steps += 1
            if search.all_done():
                break
            if bool(stopping_criteria(search.input_ids, search.all_scores or None).all()):
                break
            model_inputs = model.prepare_inputs_for_generation(
                search.input_ids, next_sequence_length=1 if use_cache else None, **model_kwargs
            )
            outputs = model(**model_inputs, return_dict=True)
        return search.finalize(model, model_kwargs)


class _GroupBeamSearch:
    """The state of one group beam search over ``batch`` inputs of ``groups × size`` beams each.

    Rows are in (input, beam) order, group ``g`` holding beams ``g·size … (g+1)·size − 1``
    of every input. `step` chooses every group's next tokens from one forward's logits;
    `finalize` ranks the hypotheses and builds generate's output.
    """

    def __init__(self, cfg, input_ids, groups: int, size: int, penalty: float, processors):
        self.cfg = cfg
        self.groups, self.size = groups, size
        self.beams = beams = groups * size
        self.batch = batch = input_ids.shape[0] // beams
        self.device = device = input_ids.device
        self.penalty = penalty
        self.do_sample = bool(cfg.do_sample)
        self.eos = compat.eos_token_tensor(cfg)
        self.eos_ids = set(self.eos.flatten().tolist()) if self.eos is not None else set()
        pad = compat.pad_token_tensor(cfg)
        self.pad_id = int(pad) if pad is not None else None
        self.prompt_len = input_ids.shape[1]
        self.keep = max(2, 1 + len(self.eos_ids)) * size  # candidates per (input, group)
        self.pre, self.post = split_processors(processors)
        want_dict = cfg.return_dict_in_generate
        self.out_scores = want_dict and cfg.output_scores
        self.out_logits = want_dict and cfg.output_logits
        self.all_scores: tuple = ()
        self.all_logits: tuple = ()
        self.input_ids = input_ids  # (batch*beams, L), grows by one column a step
        # rows of group g for every input, in (input, beam) order: (batch * size,)
        self.group_rows = [
            (
                torch.arange(batch, device=device)[:, None] * beams
                + g * size
                + torch.arange(size, device=device)
            ).flatten()
            for g in range(groups)
        ]
        self.hyps = [
            [
                _GroupHypotheses(size, cfg.length_penalty, cfg.early_stopping, cfg.max_length)
                for _ in range(groups)
            ]
            for _ in range(batch)
        ]
        self.done = [[False] * groups for _ in range(batch)]
        # only the first beam of each group starts alive, so a group does not pick one token size times
        beam_scores = torch.full((batch, beams), -1e9, dtype=torch.float, device=device)
        beam_scores[:, ::size] = 0
        self.beam_scores = beam_scores.view(-1)  # (batch * beams,)
        self.ancestry = torch.empty((input_ids.shape[0], 0), dtype=torch.long, device=device)
        self.reorder = torch.zeros(input_ids.shape[0], dtype=torch.long, device=device)

    def all_done(self) -> bool:
        return all(all(d) for d in self.done)

    # -- one step ------------------------------------------------------------------------
    def step(self, raw: torch.Tensor) -> int:
        """Choose every group's next tokens from the last position's logits ``raw``
        (batch*beams, V); append them to ``input_ids``. Returns the groups that finished."""
        input_ids = self.input_ids
        log_probs = torch.log_softmax(raw, dim=-1)
        current = torch.zeros(input_ids.shape[0], dtype=input_ids.dtype, device=self.device)
        reorder = torch.zeros(input_ids.shape[0], dtype=torch.long, device=self.device)
        processed_all = torch.zeros_like(log_probs) if self.out_scores else None
        finished = 0
        for g in range(self.groups):
            rows = self.group_rows[g]
            group_ids = input_ids[rows]  # (batch*size, L)
            scores = self._group_scores(g, group_ids, log_probs[rows], current)
            if processed_all is not None:
                processed_all[rows] = scores
            total = (scores + self.beam_scores[rows, None]).view(self.batch, -1)  # (batch, size*V)
            next_scores, next_tokens, next_local, n = self._select_group(
                g, group_ids, total, vocab=log_probs.shape[-1]
            )
            finished += n
            size = self.size
            next_local = next_local.view(-1).to(self.device)
            self.beam_scores[rows] = next_scores.view(-1).to(self.device)
            input_ids[rows] = group_ids[next_local]
            current[rows] = next_tokens.view(-1).to(self.device)
            # global row of each chosen beam: (batch*size,)
            reorder[rows] = self.beams * (next_local // size) + g * size + next_local % size
        if self.out_scores:
            self.all_scores += (processed_all,)
            self.ancestry = torch.cat([self.ancestry[reorder], reorder[:, None]], dim=1)
        if self.out_logits:
            self.all_logits += (raw,)
        self.input_ids = torch.cat([input_ids, current[:, None]], dim=-1)  # (batch*beams, L+1)
        self.reorder = reorder
        return finished

    def _group_scores(self, g: int, group_ids, scores, current) -> torch.Tensor:
        """Group ``g``'s processed log-probabilities (batch*size, V), with the Hamming penalty."""
        for proc in self.pre:
            scores = proc(group_ids, scores)
        if g > 0 and self.penalty > 0.0:
            # Hamming diversity: tokens chosen at this step by earlier groups of the same input
            earlier = current.view(self.batch, self.beams)[:, : g * self.size]  # (batch, g*size)
            counts = torch.zeros(
                (self.batch, scores.shape[-1]), dtype=scores.dtype, device=self.device
            )
            counts.scatter_add_(1, earlier, torch.ones_like(earlier, dtype=scores.dtype))
            scores = scores - self.penalty * counts.repeat_interleave(self.size, dim=0)
        for proc in self.post:
            scores = proc(group_ids, scores)
        return scores

    def _candidates(self, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``keep`` best (or sampled) entries of each row of ``total``, best first."""
        if self.do_sample:
            picked = torch.multinomial(torch.softmax(total, dim=-1), num_samples=self.keep)
            cand_scores = torch.gather(total, 1, picked)
            cand_scores, order = cand_scores.sort(dim=-1, descending=True)
            return cand_scores, picked.gather(1, order)
        return torch.topk(total, self.keep, dim=1, largest=True, sorted=True)

    def _select_group(self, g: int, group_ids, total: torch.Tensor, vocab: int):
        """Group ``g``'s next beams: scores, tokens and group-local source rows, (batch, size)
        each, and how many inputs' group ``g`` finished. Candidates ending in EOS become
        hypotheses (when among the first ``size``); the others continue."""
        size = self.size
        cand_scores, picked = self._candidates(total)
        cand_beam = (picked // vocab).tolist()
        cand_tok = (picked % vocab).tolist()
        cand_val = cand_scores.tolist()
        cur_len = self.input_ids.shape[1] + 1  # length once this step's token is appended
        rows = self.group_rows[g]
        next_scores = torch.zeros((self.batch, size), dtype=self.beam_scores.dtype)
        next_tokens = torch.zeros((self.batch, size), dtype=torch.long)
        next_local = torch.zeros((self.batch, size), dtype=torch.long)
        finished = 0
        for b in range(self.batch):
            if self.done[b][g]:
                # a finished group idles on its own first beam with pad tokens
                next_tokens[b] = self.pad_id if self.pad_id is not None else 0
                next_local[b] = b * size
                continue
            j = 0
            for rank, (beam, tok, val) in enumerate(zip(cand_beam[b], cand_tok[b], cand_val[b])):
                local = b * size + beam
                if tok in self.eos_ids:
                    if rank >= size:
                        continue
                    self.hyps[b][g].add(
                        group_ids[local].clone(),
                        val,
                        cur_len - self.prompt_len,
                        self.ancestry[rows[local]].clone() if self.out_scores else None,
                    )
                else:
                    next_scores[b, j] = val
                    next_tokens[b, j] = tok
                    next_local[b, j] = local
                    j += 1
                if j == size:
                    break
            if j < size:
                raise RuntimeError(
                    f"group {g} of input {b} found fewer than {size} continuations that are not EOS; "
                    "the logits processors removed too many tokens."
                )
            if self.hyps[b][g].is_done(max(cand_val[b]), cur_len, self.prompt_len):
                self.done[b][g] = True
                finished += 1
        return next_scores, next_tokens, next_local, finished

    # -- the output ----------------------------------------------------------------------
    def finalize(self, model, model_kwargs: dict[str, Any]):
        """Add the running beams of unfinished groups, rank every group's hypotheses, pad the output."""
        best = self._best()
        sequences = self._sequences(best)
        if not self.cfg.return_dict_in_generate:
            return sequences
        device = sequences.device
        beam_indices = None
        if self.out_scores:
            steps = max(len(h[2]) for h in best)
            beam_indices = torch.full((len(best), steps), -1, dtype=torch.long, device=device)
            for i, (_, _, idx) in enumerate(best):
                beam_indices[i, : len(idx)] = idx
        cls = _output_class(model)
        key = _cache_key(model_kwargs)
        cache_field = "cache" if "cache" in cls.__dataclass_fields__ else "past_key_values"
        return cls(
            sequences=sequences,
            sequences_scores=torch.tensor([h[0] for h in best], device=device)
            if self.out_scores
            else None,
            scores=self.all_scores if self.out_scores else None,
            logits=self.all_logits if self.out_logits else None,
            beam_indices=beam_indices,
            **{cache_field: model_kwargs.get(key) if key else None},
        )

    def _best(self) -> list[tuple[float, torch.Tensor, Any]]:
        """The ``num_return_sequences`` best hypotheses of each input over all its groups."""
        input_ids, size = self.input_ids, self.size
        final_len = input_ids.shape[1] - self.prompt_len
        for b in range(self.batch):
            for g in range(self.groups):
                if self.done[b][g]:
                    continue
                for i in range(size):
                    row = b * self.beams + g * size + i
                    self.hyps[b][g].add(
                        input_ids[row],
                        float(self.beam_scores[row]),
                        final_len,
                        self.ancestry[row] if self.out_scores else None,
                    )
        best: list[tuple[float, torch.Tensor, Any]] = []
        for b in range(self.batch):
            ranked = sorted(
                (h for g in range(self.groups) for h in self.hyps[b][g].beams), key=lambda h: h[0]
            )
            for _ in range(self.cfg.num_return_sequences):
                best.append(ranked.pop())
        return best

    def _sequences(self, best) -> torch.Tensor:
        """The hypotheses as rows, each ended by EOS and padded to the longest (+1, ≤ max_length)."""
        pad_id, eos = self.pad_id, self.eos
        lengths = [len(h[1]) for h in best]
        width = min(max(lengths) + 1, self.cfg.max_length)
        sequences = self.input_ids.new_full((len(best), width), pad_id if pad_id is not None else 0)
        if min(lengths) != max(lengths) and pad_id is None:
            raise ConfigError(
                "generate.pad_token_id", "sequences of different lengths need a pad_token_id"
            )
        for i, (_, hyp, _) in enumerate(best):
            sequences[i, : len(hyp)] = hyp
            if len(hyp) < width and eos is not None:
                sequences[i, len(hyp)] = eos.flatten()[0]
        return sequences


@hookimpl
def decodekit_register_strategies(register):
    register(DiverseBeam)
