"""Superposed Decoding, from "Superposed Decoding: Multiple Generations from a Single Autoregressive Inference Pass" (arXiv:2405.18400).

k drafts advance together on ONE row of the model per input: each step the
input embedding is the superposition ``Σ_i w_i · E[last token of draft i]``
(``w`` = softmax of the drafts' scores), the model runs once, and its
next-token distribution — shared by all drafts, after temperature and
truncation to the ``n_token_sample`` most likely tokens — is rescored per draft
by interpolating it with an n-gram model,
``(1 − α) log p_LM + α log Σ_n w_n P_n`` (orders 2–6). The top ``2k``
of the ``k × n_token_sample`` candidates are kept; those that hit EOS (or any
stopping criterion) are set aside as finished drafts, the best ``k`` others
live on. One model forward per step, one cache (the model's own, batch =
number of inputs), whatever k is.

The RAIVNLab reference drives Meta's Llama code with a hard-coded 32,000
vocabulary; this runs in transformers' ``generate(custom_generate=...)`` on any
causal LM with input embeddings, with transformers' logits processors (applied
per draft) and stopping criteria. Returns ``k`` sequences per input, best
(highest score) first. Measured results: docs/benchmarks.md ("Superposed decoding").
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
from decodekit import compat
from decodekit.errors import AttachError, ConfigError
from decodekit.hookspecs import hookimpl
from decodekit.strategy import Params, Strategy
from pydantic import Field, model_validator

from .ngram import NGramModel

PAPER_WEIGHTS = (0.01, 0.04, 0.15, 0.18, 0.12)


class SuperposedParams(Params):
    """Parameters of `superposed` (defaults: the paper's Llama-2-7B settings, params/p15_d3_mixed.json)."""

    k: int = Field(3, ge=1, description="Number of drafts generated together (paper: 3).")
    n_token_sample: int | None = Field(
        None,
        ge=1,
        description="The shared next-token distribution is truncated to this many most likely "
        "tokens and renormalised (None: 3 × k, the paper's 9 for k = 3).",
    )
    alpha: float = Field(
        0.54,
        ge=0.0,
        le=1.0,
        description="Weight of the n-gram model in (1 − α) log p_LM + α log p_ngram (paper: 0.54; "
        "0 uses the LM alone and needs no n-gram model).",
    )
    ngram: str | None = Field(
        None,
        description="Folder of an n-gram model built by `decodekit ngram build` with the model's "
        "tokenizer (required when alpha > 0).",
    )
    ngram_weights: tuple[float, ...] = Field(
        PAPER_WEIGHTS,
        min_length=1,
        max_length=5,
        description="Interpolation weights of the n-gram orders 2, 3, 4, 5, 6 (paper: "
        "0.01, 0.04, 0.15, 0.18, 0.12); an order whose context was never seen adds nothing.",
    )
    temperature: float = Field(
        0.06,
        gt=0.0,
        description="Temperature of the LM distribution before truncation (paper: 0.06).",
    )
    penalty: float = Field(
        200.0,
        ge=0.0,
        description="Subtracted from a draft's LM score when the n-gram model gives none of its "
        "candidates any probability (reference code: 200).",
    )

    @model_validator(mode="after")
    def _needs_ngram(self):
        if self.alpha > 0 and self.ngram is None:
            raise ValueError(
                "alpha > 0 needs an n-gram model: set ngram to a folder made by "
                "`decodekit ngram build CORPUS --tokenizer MODEL --out DIR`, or set alpha to 0"
            )
        return self


@lru_cache(maxsize=4)
def _load_ngram(path: str) -> NGramModel:
    from decodekit.config import resolve_model

    return NGramModel.load(resolve_model(path, path="params.ngram"))  # a folder, or zoo:<name>


def superposed_embedding(
    embed: torch.nn.Module, tokens: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``Σ_i weights[b, i] · embed(tokens[b, i])``: (B, k) tokens and weights -> (B, 1, H)."""
    vectors = embed(tokens)  # (B, k, H)
    return torch.bmm(weights.to(vectors.dtype)[:, None, :], vectors)  # (B, 1, k) @ (B, k, H)


def _pad_to(seq: torch.Tensor, width: int, pad_id: int) -> torch.Tensor:
    """``(B, k, L)`` padded on the right with ``pad_id`` to ``width`` columns."""
    missing = width - seq.shape[-1]
    return seq if missing <= 0 else torch.nn.functional.pad(seq, (0, missing), value=pad_id)


def draft_weights(scores: torch.Tensor) -> torch.Tensor:
    """Softmax of the drafts' scores (B, k); a row with no live draft gets uniform weights."""
    # -inf -> the lowest finite value: an all -inf row becomes uniform, and elsewhere the
    # replaced entries still get weight exactly 0
    return torch.softmax(scores.nan_to_num(neginf=torch.finfo(scores.dtype).min), dim=-1)


class Superposed(Strategy):
    """k drafts from one forward pass per step, via superposed input embeddings and n-gram rescoring."""

    name = "superposed"
    loops = ("token-autoregression",)
    Params = SuperposedParams
    slot = "proposer"
    paper = (
        "Superposed Decoding: Multiple Generations from a Single Autoregressive Inference Pass, "
        "arXiv:2405.18400"
    )

    def on_attach(self, run) -> None:
        self.ngram = _load_ngram(str(self.params.ngram)) if self.params.alpha > 0 else None
        self.reset(run)  # stats() reads zeros before the first call

    def on_detach(self, run) -> None:
        self.ngram = None

    def reset(self, run) -> None:
        self.steps = 0

    def stats(self) -> dict[str, Any]:
        return {"steps": self.steps, "drafts": self.params.k}

    def ideal_speedup(self, run) -> float | None:
        # k sequences for the forwards of one: the FLOP-ideal gain over k separate greedy runs
        return float(self.params.k)

    # -- checks ----------------------------------------------------------------------------
    def _check(self, model, cfg, model_kwargs) -> torch.nn.Module:
        where = f"strategies.{self.name}.params"
        if model.config.is_encoder_decoder:
            raise AttachError(
                f"superposed decoding drives decoder-only causal LMs; {type(model).__name__} is an "
                "encoder-decoder model."
            )
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if not isinstance(embed, torch.nn.Module):
            raise AttachError(
                f"{type(model).__name__} has no input embeddings (get_input_embeddings), so drafts "
                "cannot be superposed; use a model that accepts inputs_embeds."
            )
        if cfg.num_beams != 1 or cfg.num_return_sequences != 1:
            raise ConfigError(
                where + ".k",
                "superposed decoding returns k drafts per input itself; call generate without "
                "num_beams / num_return_sequences and set k in the params.",
            )
        if model_kwargs.get("inputs_embeds") is not None:
            raise ConfigError(where, "pass input_ids to generate, not inputs_embeds.")
        if self.ngram is not None:
            vocab = model.config.get_text_config().vocab_size
            if self.ngram.vocab_size > vocab:
                raise ConfigError(
                    where + ".ngram",
                    f"the n-gram model counts ids up to {self.ngram.vocab_size - 1} but the model's "
                    f"vocabulary has {vocab}; build it with this model's tokenizer.",
                )
        return embed

    # -- the loop ----------------------------------------------------------------------------
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
        cfg = generation_config
        embed = self._check(model, cfg, model_kwargs)
        p = self.params
        k = p.k
        n_sample = p.n_token_sample or 3 * k
        batch, prompt_len = input_ids.shape
        device = input_ids.device
        pad = compat.pad_token_tensor(cfg)
        pad_id = int(pad) if pad is not None else 0
        max_length = cfg.max_length
        mask = model_kwargs.get("attention_mask")
        real = mask.sum(-1).long() if mask is not None else torch.full((batch,), prompt_len)
        real = real.to(device)

        drafts = input_ids[:, None, :].repeat(1, k, 1)  # (B, k, L)
        alive = torch.full((batch, k), float("-inf"), dtype=torch.float64, device=device)
        alive[:, 0] = 0.0  # only the first draft exists before the first token
        fin_seq = drafts.clone()
        fin = torch.full((batch, k), float("-inf"), dtype=torch.float64, device=device)
        context = (
            input_ids  # (B, L): one row per input, for transformers' mask/position bookkeeping
        )

        outputs = compat.prefill(model, input_ids, cfg, model_kwargs)
        finished = False  # has any draft stopped yet
        while True:
            model_kwargs = compat.update_model_kwargs(model, outputs, model_kwargs)
            logits = outputs.logits[:, -1, :].to(dtype=torch.float32, device=device)  # (B, V)
            del outputs
            cur = drafts.shape[-1]
            top_p, top_tok = self._candidates(
                logits, drafts, logits_processor, n_sample
            )  # (B, k, n)
            n = top_tok.shape[-1]
            step_lp = self._rescore(drafts, top_tok, top_p, real + (cur - prompt_len))  # (B, k, n)
            cand = (alive[:, :, None] + step_lp).view(batch, k * n)
            want = 2 * k
            padded = cand.shape[1] < want
            if padded:  # fewer candidates than 2k: pad with impossible ones
                fill = torch.full(
                    (batch, want - cand.shape[1]), float("-inf"), dtype=cand.dtype, device=device
                )
                cand = torch.cat([cand, fill], dim=1)
            cand_lp, cand_idx = torch.topk(cand, want, dim=1)  # (B, 2k)
            impossible = torch.isneginf(cand_lp)
            if padded:  # the padding's indices point past the real candidates
                cand_idx = cand_idx.clamp(max=k * n - 1)
            parent = cand_idx // n
            tok = torch.gather(top_tok.reshape(batch, k * n), 1, cand_idx)
            tok = tok.masked_fill(impossible, pad_id)
            cand_seq = torch.cat(
                [torch.gather(drafts, 1, parent[:, :, None].expand(-1, -1, cur)), tok[:, :, None]],
                dim=2,
            )  # (B, 2k, L+1)
            stop = stopping_criteria(cand_seq.view(batch * want, cur + 1), None).view(batch, want)
            stop = stop.to(device) & ~impossible
            # live drafts: the best k candidates that did not stop
            alive, live_idx = torch.topk(cand_lp.masked_fill(stop, float("-inf")), k, dim=1)
            drafts = torch.gather(cand_seq, 1, live_idx[:, :, None].expand(-1, -1, cur + 1))
            # finished drafts: the best k among the old ones and the candidates that stopped
            # (fin_seq is padded to the current length only when it changes, and at the end)
            if bool(stop.any()):
                finished = True
                fin_seq = torch.cat([_pad_to(fin_seq, cur + 1, pad_id), cand_seq], dim=1)
                fin, fin_idx = torch.topk(
                    torch.cat([fin, cand_lp.masked_fill(~stop, float("-inf"))], dim=1), k, dim=1
                )
                fin_seq = torch.gather(fin_seq, 1, fin_idx[:, :, None].expand(-1, -1, cur + 1))
            self.steps += 1
            # with no draft finished yet, the loop can only be done if every candidate of
            # every row was impossible; it then runs on to max_length with the same result
            if (finished and self._all_done(alive, fin)) or cur + 1 >= max_length:
                fin_seq = _pad_to(fin_seq, cur + 1, pad_id)
                break
            # one forward for all k drafts: the superposition of their last tokens
            context = torch.cat([context, drafts[:, 0, -1:]], dim=1)  # (B, L+1)
            model_inputs = model.prepare_inputs_for_generation(
                context, next_sequence_length=1, **model_kwargs
            )
            model_inputs.pop("input_ids", None)
            model_inputs["inputs_embeds"] = superposed_embedding(
                embed, drafts[:, :, -1], draft_weights(alive)
            )  # (B, 1, H)
            outputs = model(**model_inputs, return_dict=True)
        return self._output(model, cfg, fin_seq, fin, prompt_len, pad_id)

    def _candidates(
        self, logits: torch.Tensor, drafts: torch.Tensor, logits_processor, n_sample: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each draft's candidate tokens and their renormalised probabilities: (B, k, n) each.

        The next-token distribution is shared; logits processors may still read a draft's own
        ids, so with processors it is processed once per draft, on the batch shape that
        `generate` built them for (a processor may hold per-row state such as prompt lengths).
        """
        k = drafts.shape[1]
        temperature = self.params.temperature
        if logits_processor:
            scores = torch.stack(
                [logits_processor(drafts[:, i], logits.clone()) for i in range(k)], dim=1
            )  # (B, k, V)
        else:
            scores = logits[:, None, :]  # (B, 1, V): one distribution serves every draft
        probs = torch.softmax(scores.double() / temperature, dim=-1)
        top_p, top_tok = torch.topk(probs, min(n_sample, probs.shape[-1]), dim=-1)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        shape = (drafts.shape[0], k, top_p.shape[-1])
        return top_p.expand(shape), top_tok.expand(shape)

    def _rescore(
        self,
        drafts: torch.Tensor,
        top_tok: torch.Tensor,
        top_p: torch.Tensor,
        lengths: torch.Tensor,
    ) -> torch.Tensor:
        """Per-draft log-scores of the candidates (B, k, n): LM alone, or interpolated with the n-gram model."""
        a = self.params.alpha
        if self.ngram is None or a == 0:
            return torch.log(top_p)
        batch, k, n = top_tok.shape
        context = drafts[:, :, -(self.ngram.max_order - 1) :]  # all an n-gram can look at
        ng = (
            self.ngram.interpolate(
                context.reshape(batch * k, -1),
                top_tok.reshape(batch * k, n),
                self.params.ngram_weights,
                lengths.repeat_interleave(k),
            )
            .numpy()
            .reshape(batch, k, n)
        )
        # numpy, like the look-ups: a handful of operations on B × k × n numbers per step
        p = top_p.detach().cpu().numpy()
        with np.errstate(divide="ignore"):
            lm = np.log(p)
            mixed = (1 - a) * lm + a * np.log(np.where(p > 0, ng, 0.0))
        none = np.isneginf(mixed).all(axis=-1, keepdims=True)  # no candidate seen by the n-grams
        scores = np.where(none, (1 - a) * lm - self.params.penalty, mixed)
        return torch.from_numpy(scores).to(top_p.device)

    @staticmethod
    def _all_done(alive: torch.Tensor, fin: torch.Tensor) -> bool:
        # scores only decrease, so a live draft can never pass the k-th finished one (a row
        # with no live draft has best -inf, which is <= anything)
        return bool((alive.max(dim=1).values <= fin.min(dim=1).values).all())

    def _output(self, model, cfg, fin_seq, fin, prompt_len, pad_id):
        """k sequences per input, best first: (B*k, L); a slot no draft reached is prompt + pad."""
        batch, k, width = fin_seq.shape
        seqs = fin_seq.clone()
        seqs[:, :, prompt_len:][torch.isneginf(fin)] = pad_id
        sequences = seqs.view(batch * k, width)
        if not cfg.return_dict_in_generate:
            return sequences
        from transformers.generation.utils import GenerateBeamDecoderOnlyOutput

        return GenerateBeamDecoderOnlyOutput(
            sequences=sequences, sequences_scores=fin.reshape(-1).float()
        )


@hookimpl
def decodekit_register_strategies(register):
    register(Superposed)
