"""Masked-diffusion text generation with LLaDA semantics: `MaskedDiffusionLMPipeline`.

`MaskedDiffusionLMPipeline` runs any Hugging Face model that maps token ids to
logits with bidirectional attention as a masked diffusion LM, following LLaDA's
``generate`` (Nie et al., "Large Language Diffusion Models", arXiv:2502.09992):
the prompt is followed by ``gen_length`` mask tokens; generation proceeds in
semi-autoregressive blocks of ``block_length``; ``steps`` are split evenly over
the blocks; each step predicts every masked position (Gumbel-max in float64 at
temperature > 0), and the remasking policy commits the most confident ones,
``n // steps`` per step and one more in the first ``n % steps`` steps; nothing
past the current block is committed and committed tokens never change.
Classifier-free guidance masks the prompt in the unconditional copy and combines
``un + (s + 1)(cond - un)``. Dream's options (Ye et al., "Dream 7B",
arXiv:2508.15487) are ``shift=True`` (position ``i`` is predicted by the output
at ``i - 1``) and ``schedule="dream"`` (``linspace(1, eps, steps + 1)``).
Confidence-threshold parallel decoding (Fast-dLLM, arXiv:2505.22618) is the
``"threshold"`` remasking policy: each step commits the top token and every
other one above ``threshold``, and a block ends when it holds no mask.

Batches are left-padded with an attention mask; position ids start at 0 at each
row's first real token, and random draws come from one generator per row over
the generated region only, so a row's result equals the same prompt run alone.

The loop calls decodekit's runtime hooks when strategies are attached:
``decodekit_mdm_forward`` (a cache may serve the model call),
``decodekit_mdm_select`` (a selector may replace the remasking policy), and
``decodekit_mdm_committed`` after tokens were written. It counts model calls
(``run.nfe``; ``run.served`` when a strategy served one) and tokens computed
per step. Its adapter, ``masked-diffusion-lm``, is in
``decodekit.pipelines.masked_diffusion_adapter``; `load_bidirectional_lm`
(``decodekit.pipelines.bidirectional_lm``) loads Dream and converted LLaDA
checkpoints for it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from decodekit.logits_processors import classifier_free_guidance
from decodekit.remasking import (
    RemaskingPolicy,
    get_remasking_policy,
    transfer_count_schedule,
)
from decodekit.session import attached_run

__all__ = [
    "MaskedDiffusionLMPipeline",
    "MaskedDiffusionOutput",
    "dream_transfer_counts",
    "shift_logits",
]


@dataclass
class MaskedDiffusionOutput:
    """What a `MaskedDiffusionLMPipeline` call returns."""

    sequences: torch.Tensor
    """Long ``(B, gen_length)``: the generated tokens (no prompt, no padding)."""
    texts: list[str] | None = None
    """Decoded texts, cut after the first EOS; None without a tokenizer."""
    nfe: int = 0
    """Model calls (a CFG step's doubled batch is one call)."""
    tokens_computed: list[int] = field(default_factory=list)
    """Per model call, the token positions the model computed (batch × fed length)."""
    steps_per_block: list[int] = field(default_factory=list)
    """Model calls each block took (varies with threshold decoding)."""


def shift_logits(logits: torch.Tensor) -> torch.Tensor:
    """Dream's shift: position ``i`` takes the output at ``i - 1`` (position 0 keeps its own), ``(B, L, V)``."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def dream_transfer_counts(
    num_masked: torch.Tensor, step: int, steps: int, eps: float
) -> torch.Tensor:
    """Dream's commit count at ``step`` of ``steps``: ``int(n (1 - s / t))`` on ``linspace(1, eps, steps + 1)``.

    ``num_masked`` ``(B,)`` is each row's masked count now; the last step commits all of them.
    """
    if step >= steps - 1:
        return num_masked.clone()
    timesteps = torch.linspace(1, eps, steps + 1, dtype=torch.float64)
    t, s = timesteps[step], timesteps[step + 1]
    return (num_masked.to(torch.float64) * (1 - s / t)).long()  # (B,)


class MaskedDiffusionLMPipeline:
    """Generate text from a bidirectional token-to-logits model by masked diffusion (LLaDA semantics).

    Args:
        model: a Hugging Face model (``model(input_ids, attention_mask=, position_ids=)``
            returning ``.logits`` ``(B, L, V)``) with bidirectional attention.
        tokenizer: optional; needed for string prompts and ``texts``.
        mask_token_id: the mask token; default ``tokenizer.mask_token_id``, else
            ``model.config.mask_token_id`` (LLaDA's and Dream's configs carry it).
        eos_token_id: default ``tokenizer.eos_token_id``; texts are cut after it.
        pad_token_id: the id written in left padding; default the tokenizer's, else the EOS id.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        mask_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        # transformers' LMs take logits_to_keep (which positions get the LM head)
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        if mask_token_id is None and tokenizer is not None:
            mask_token_id = getattr(tokenizer, "mask_token_id", None)
        if mask_token_id is None:
            mask_token_id = getattr(getattr(model, "config", None), "mask_token_id", None)
        if mask_token_id is None:
            raise ValueError(
                "MaskedDiffusionLMPipeline needs mask_token_id (neither the tokenizer nor the "
                "model's config names a mask token); "
                "pass mask_token_id=<id of the mask token the model was trained with>."
            )
        self.mask_token_id = int(mask_token_id)
        if eos_token_id is None and tokenizer is not None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_id = eos_token_id
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad_token_id if pad_token_id is not None else (eos_token_id or 0)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------ inputs
    def encode(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize prompts, left-padded: ``input_ids`` and ``attention_mask`` ``(B, P)``."""
        if self.tokenizer is None:
            raise ValueError("string prompts need a tokenizer; pass input_ids instead.")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        return left_pad(rows, self.pad_token_id)

    # ------------------------------------------------------------------------ the call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        input_ids: torch.Tensor | list[list[int]] | None = None,
        attention_mask: torch.Tensor | None = None,
        gen_length: int = 128,
        block_length: int = 32,
        steps: int = 128,
        temperature: float = 0.0,
        cfg_scale: float = 0.0,
        remasking: str | RemaskingPolicy = "low-confidence",
        threshold: float | None = None,
        shift: bool = False,
        schedule: Literal["llada", "dream"] = "llada",
        eps: float = 1e-3,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> MaskedDiffusionOutput:
        """Generate ``gen_length`` tokens after each prompt.

        Args:
            prompt: a string or list of strings (needs the tokenizer).
            input_ids: token ids ``(B, P)`` (left-padded) or a list of unpadded rows.
            attention_mask: ``(B, P)``, 1 on real tokens, 0 on left padding.
            gen_length: tokens to generate; a multiple of ``block_length``.
            block_length: semi-autoregressive block size (``gen_length`` for one block).
            steps: model calls in all, split evenly over the blocks (a multiple of the
                number of blocks); threshold decoding may finish a block earlier.
            temperature: Gumbel-max temperature; 0 is argmax.
            cfg_scale: LLaDA's guidance scale (0: no guidance).
            remasking: a core remasking policy name (``low-confidence``, ``random``,
                ``margin``, ``entropy``, ``threshold``) or a policy instance.
            threshold: with ``remasking="threshold"``, the confidence threshold τ (default 0.9);
                giving it alone selects threshold decoding.
            shift: Dream's shifted logits (AR-adapted models).
            schedule: per-step commit counts: ``"llada"`` (even split) or ``"dream"``
                (``linspace(1, eps, steps + 1)``).
            eps: the last timestep of the Dream schedule.
            generator: one ``torch.Generator`` or one per row (a row's draws then
                do not depend on the batch); needed at temperature > 0 and for ``random``.
        """
        call_kwargs = dict(
            prompt=prompt,
            input_ids=input_ids,
            attention_mask=attention_mask,
            gen_length=gen_length,
            block_length=block_length,
            steps=steps,
            temperature=temperature,
            cfg_scale=cfg_scale,
            remasking=remasking,
            threshold=threshold,
            shift=shift,
            schedule=schedule,
            eps=eps,
            generator=generator,
        )
        run = attached_run(self)
        if run is None:
            return self._generate(None, **call_kwargs)
        return run.guarded_call(call_kwargs, lambda: self._generate(run, **call_kwargs))

    def _generate(
        self,
        run: Any,
        *,
        prompt,
        input_ids,
        attention_mask,
        gen_length,
        block_length,
        steps,
        temperature,
        cfg_scale,
        remasking,
        threshold,
        shift,
        schedule,
        eps,
        generator,
    ) -> MaskedDiffusionOutput:
        ids, pad_mask = self._prompt_tensors(prompt, input_ids, attention_mask)
        num_blocks, steps_per_block = check_lengths(gen_length, block_length, steps)
        if schedule not in ("llada", "dream"):
            raise ValueError(f"schedule must be 'llada' or 'dream', got {schedule!r}.")
        options = _Options(
            policy=_remasking_policy(remasking, threshold),
            steps_per_block=steps_per_block,
            temperature=temperature,
            cfg_scale=cfg_scale,
            shift=shift,
            schedule=schedule,
            eps=eps,
            generators=_row_generators(generator, ids.shape[0]),
        )
        canvas = self._canvas(ids, pad_mask, gen_length)
        prompt_len = ids.shape[1]
        decoding = _Decoding(self, run, options, canvas)
        for block in range(num_blocks):
            start = prompt_len + block * block_length
            decoding.decode_block(block, start, start + block_length)
        out = decoding.out
        out.sequences = canvas.x[:, prompt_len:]
        out.nfe = len(out.tokens_computed)
        out.texts = self._texts(out.sequences)
        return out

    def _canvas(self, ids: torch.Tensor, pad_mask: torch.Tensor, gen_length: int) -> _Canvas:
        """The prompts ``(B, P)``, left-padded, followed by ``gen_length`` masks, on the model's device."""
        batch, prompt_len = ids.shape
        device = self.device
        masks = torch.full((batch, gen_length), self.mask_token_id, dtype=torch.long)
        x = torch.cat([ids, masks], dim=1).to(device)  # (B, L = P + G)
        attn = torch.cat([pad_mask, torch.ones(batch, gen_length, dtype=torch.long)], dim=1)
        attn = attn.to(device)  # (B, L)
        position_ids = (attn.cumsum(dim=1) - 1).clamp(min=0)  # (B, L)
        prompt_index = torch.zeros_like(x, dtype=torch.bool)  # (B, L)
        prompt_index[:, :prompt_len] = pad_mask.to(device).bool()
        return _Canvas(x, attn, position_ids, prompt_index)

    def _prompt_tensors(self, prompt, input_ids, attention_mask):
        if (prompt is None) == (input_ids is None):
            raise ValueError("pass exactly one of prompt (strings) or input_ids (token ids).")
        if prompt is not None:
            return self.encode(prompt)
        if isinstance(input_ids, list):
            if attention_mask is not None:
                raise ValueError(
                    "with a list of rows, leave attention_mask out: rows are padded here."
                )
            return left_pad([list(r) for r in input_ids], self.pad_token_id)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(
                f"input_ids must be a long tensor (B, P), got {input_ids.dtype} {tuple(input_ids.shape)}."
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                f"{tuple(input_ids.shape)}."
            )
        am = attention_mask.long().cpu()
        if bool((am[:, 1:] < am[:, :-1]).any()):
            raise ValueError(
                "attention_mask must be left padding (zeros before ones in each row); "
                "pad prompts on the left (tokenizer.padding_side = 'left')."
            )
        if bool((input_ids.cpu()[am.bool()] == self.mask_token_id).any()):
            raise ValueError("a prompt contains the mask token id; remove it from the prompt.")
        return input_ids.cpu(), am

    def _texts(self, sequences: torch.Tensor) -> list[str] | None:
        if self.tokenizer is None:
            return None
        rows = []
        for row in sequences.tolist():
            if self.eos_token_id is not None and self.eos_token_id in row:
                row = row[: row.index(self.eos_token_id)]
            rows.append(row)
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows: ``input_ids`` and ``attention_mask`` ``(B, P)``."""
    if not rows:
        raise ValueError("no prompts given.")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def check_lengths(gen_length: int, block_length: int, steps: int) -> tuple[int, int]:
    """Validate LLaDA's lengths; returns (number of blocks, steps per block)."""
    for name, value in (
        ("gen_length", gen_length),
        ("block_length", block_length),
        ("steps", steps),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
    if gen_length % block_length:
        raise ValueError(
            f"gen_length ({gen_length}) must be a multiple of block_length ({block_length}); "
            f"e.g. block_length={gen_length} for one block."
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(
            f"steps ({steps}) must be a multiple of the number of blocks ({num_blocks} = "
            f"gen_length / block_length) so that every block gets the same steps."
        )
    per_block = steps // num_blocks
    if per_block > block_length:
        raise ValueError(
            f"steps per block ({per_block}) exceed block_length ({block_length}); "
            f"use steps <= gen_length ({gen_length})."
        )
    return num_blocks, per_block


def _row_generators(generator, batch: int) -> list[torch.Generator] | torch.Generator | None:
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} rows; pass one per row.")
        return list(generator)
    return generator


def _apply_policy(policy, logits, x, mask_index, num_transfer, temperature, generators):
    """Run ``policy`` over the batch, or row by row with one generator each."""
    if not isinstance(generators, list):
        return policy(
            logits,
            x,
            mask_index,
            num_transfer,
            temperature=temperature,
            generator=generators,
        )
    parts = []
    for b, gen in enumerate(generators):
        n = None if num_transfer is None else num_transfer[b : b + 1]
        parts.append(
            policy(
                logits[b : b + 1],
                x[b : b + 1],
                mask_index[b : b + 1],
                n,
                temperature=temperature,
                generator=gen,
            )
        )
    return type(parts[0])(*(torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))))


def _remasking_policy(remasking: str | RemaskingPolicy, threshold: float | None) -> RemaskingPolicy:
    """The policy a call asked for; ``threshold`` alone selects threshold decoding."""
    if threshold is not None and remasking == "low-confidence":
        remasking = "threshold"
    params = {"threshold": threshold} if remasking == "threshold" and threshold is not None else {}
    return get_remasking_policy(remasking, **params)


@dataclass(frozen=True)
class _Options:
    """One call's validated decoding options."""

    policy: RemaskingPolicy
    steps_per_block: int
    temperature: float
    cfg_scale: float
    shift: bool
    schedule: str
    eps: float
    generators: list[torch.Generator] | torch.Generator | None


@dataclass
class _Canvas:
    """The sequence being decoded and its fixed companions, each ``(B, L)``."""

    x: torch.Tensor
    """Long: the prompt (left-padded), then the generated region; masks until committed."""
    attention_mask: torch.Tensor
    """Long: 0 on left padding."""
    position_ids: torch.Tensor
    """Long: 0 at each row's first real token."""
    prompt_index: torch.Tensor
    """Bool: the real prompt tokens (masked in the unconditional copy under CFG)."""


@dataclass(frozen=True)
class _ModelCall:
    """One model call's inputs, the arguments of ``decodekit_mdm_forward``.

    Tensors are ``(B', L)``: ``B' = 2B`` under classifier-free guidance
    (the conditional rows, then the unconditional ones), else ``B``.
    """

    step: int
    block_step: int
    x: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    mask_index: torch.Tensor
    need_logits: torch.Tensor
    window: tuple[int, int]
    """Columns ``(lo, hi)`` whose logits the step reads."""


class _Decoding:
    """One pipeline call's loop: blocks, their steps, each step's model call and commit."""

    def __init__(
        self, pipe: MaskedDiffusionLMPipeline, run: Any, options: _Options, canvas: _Canvas
    ):
        self.pipe = pipe
        self.run = run
        self.options = options
        self.canvas = canvas
        self.mask_id = pipe.mask_token_id
        self.step = 0  # model calls so far in this pipeline call
        self.out = MaskedDiffusionOutput(sequences=canvas.x)

    def decode_block(self, block: int, start: int, end: int) -> None:
        """Step until columns ``start:end`` hold no mask; record the steps it took."""
        block_masked = (self.canvas.x[:, start:end] == self.mask_id).sum(dim=1)  # (B,)
        counts = transfer_count_schedule(block_masked.cpu(), self.options.steps_per_block)  # (B, S)
        block_step = 0
        while bool((self.canvas.x[:, start:end] == self.mask_id).any()):
            self.decode_step(block, start, end, block_step, counts)
            self.step += 1
            block_step += 1
        self.out.steps_per_block.append(block_step)

    def decode_step(
        self, block: int, start: int, end: int, block_step: int, counts: torch.Tensor
    ) -> None:
        """One model call over the block, then commit what the remasking policy chose."""
        options = self.options
        x = self.canvas.x
        mask_index = x == self.mask_id  # (B, L)
        policy = self.step_policy()
        if policy.needs_num_transfer and block_step >= options.steps_per_block:
            raise RuntimeError(
                f"block {block} still holds masks after its {options.steps_per_block} steps; "
                "a custom policy committed fewer tokens than scheduled."
            )
        logits = self.block_logits(start, end, block_step, mask_index)  # (B, block, V)
        if not policy.needs_num_transfer:
            num_transfer = None
        elif options.schedule == "dream":
            masked_now = mask_index[:, start:end].sum(dim=1).cpu()
            num_transfer = dream_transfer_counts(
                masked_now, block_step, options.steps_per_block, options.eps
            )
        else:
            num_transfer = counts[:, block_step]
        # noise is drawn per row over the block only (batch-invariant)
        result = _apply_policy(
            policy,
            logits,
            x[:, start:end],
            mask_index[:, start:end],
            num_transfer,
            options.temperature,
            options.generators,
        )
        self.commit(start, end, result)

    def step_policy(self) -> RemaskingPolicy:
        """The call's policy, unless a strategy's ``decodekit_mdm_select`` replaces it this step."""
        run, policy = self.run, self.options.policy
        if run is not None and run.has("decodekit_mdm_select"):
            chosen = run.call("decodekit_mdm_select", run=run, step=self.step, policy=policy)
            return chosen if chosen is not None else policy
        return policy

    def block_logits(
        self, start: int, end: int, block_step: int, mask_index: torch.Tensor
    ) -> torch.Tensor:
        """Logits of the block's columns ``(B, end - start, V)``, mask token excluded."""
        shift = self.options.shift
        # The positions whose logits this step reads (Dream: one to the left).
        need = mask_index.clone()
        need[:, :start] = False
        need[:, end:] = False
        if shift:
            need = torch.cat([need[:, 1:], torch.zeros_like(need[:, :1])], dim=1)
        # Only the current block can commit, so logits are asked for, and the
        # sampler sees, its columns alone (Dream: from one column to the left).
        # With a large vocabulary, the LM head and the float64 work over every
        # position would cost more than the model's layers.
        lo = max(start - 1, 0) if shift else start
        call = self.model_call(block_step, mask_index, need, (lo, end))
        logits = self.logits(call)  # (B, end - lo, V)
        if shift:  # Dream: position i reads the output at i - 1 (position 0 its own)
            logits = shift_logits(logits)[:, start - lo :]  # (B, block, V)
        if self.mask_id < logits.shape[-1]:
            # Never predict the mask token itself: committing it would leave the
            # position masked (LLaDA's models never predict it; random ones may).
            logits = logits.clone()
            logits[..., self.mask_id] = float("-inf")
        return logits

    def model_call(
        self, block_step: int, mask_index: torch.Tensor, need: torch.Tensor, window: tuple[int, int]
    ) -> _ModelCall:
        """The step's model inputs; under CFG the unconditional copy (prompt masked) is appended."""
        canvas = self.canvas
        x, attn, pos = canvas.x, canvas.attention_mask, canvas.position_ids
        if self.options.cfg_scale > 0:
            un_x = x.masked_fill(canvas.prompt_index, self.mask_id)
            mask_index = torch.cat([mask_index, un_x == self.mask_id])
            x = torch.cat([x, un_x])  # (2B, L)
            attn, pos, need = (
                torch.cat([attn, attn]),
                torch.cat([pos, pos]),
                torch.cat([need, need]),
            )
        return _ModelCall(
            step=self.step,
            block_step=block_step,
            x=x,
            attention_mask=attn,
            position_ids=pos,
            mask_index=mask_index,
            need_logits=need,
            window=window,
        )

    def logits(self, call: _ModelCall) -> torch.Tensor:
        """Run ``call`` (served by a strategy when one answers): logits ``(B, hi - lo, V)``, guided under CFG."""
        run, out = self.run, self.out
        lo, hi = call.window
        logits = None
        if run is not None:
            run.nfe += 1
            served = run.call(
                "decodekit_mdm_forward",
                run=run,
                step=call.step,
                block_step=call.block_step,
                model=self.pipe.model,
                x=call.x,
                attention_mask=call.attention_mask,
                position_ids=call.position_ids,
                mask_index=call.mask_index,
                need_logits=call.need_logits,
                logits_window=call.window,
            )
            if served is not None:
                run.served += 1
                logits, computed = served if isinstance(served, tuple) else (served, None)
                out.tokens_computed.append(
                    int(computed) if computed is not None else call.x.numel()
                )
        if logits is None:
            keep = {}
            if self.pipe._keeps_logits:  # the LM head on the window's columns only
                keep["logits_to_keep"] = torch.arange(lo, hi, device=call.x.device)
            logits = self.pipe.model(
                input_ids=call.x,
                attention_mask=call.attention_mask,
                position_ids=call.position_ids,
                **keep,
            ).logits  # (B', L or hi - lo, V)
            out.tokens_computed.append(call.x.numel())
        if logits.shape[1] != hi - lo:  # a full-length answer
            logits = logits[:, lo:hi]
        if self.options.cfg_scale > 0:
            cond, uncond = logits.chunk(2)
            logits = classifier_free_guidance(
                cond, uncond, self.options.cfg_scale, convention="llada"
            )
        return logits

    def commit(self, start: int, end: int, result: Any) -> None:
        """Write the policy's block ``result.x`` into the sequence; tell ``decodekit_mdm_committed``."""
        x = self.canvas.x
        committed = torch.zeros_like(x, dtype=torch.bool)  # (B, L)
        committed[:, start:end] = result.committed
        x = torch.cat([x[:, :start], result.x, x[:, end:]], dim=1)  # (B, L)
        self.canvas.x = x
        run = self.run
        if run is not None and run.has("decodekit_mdm_committed"):
            run.call("decodekit_mdm_committed", run=run, step=self.step, x=x, committed=committed)
