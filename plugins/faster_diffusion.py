"""Faster Diffusion: Rethinking the Role of UNet Encoder in Diffusion Models (arXiv:2312.09608).

Encoder propagation: the UNet's encoder features change little between
adjacent steps, so at *key* steps the full UNet runs and the inputs of its
decoder (mid-block output and down-block skip residuals, ControlNet residuals
already added) are kept in a `StepFeatureMemo`;
at the other steps only the decoder runs, on those features with that step's
own time embedding and text embedding.
Parallel decoder: the decoder outputs for a key step's following non-key steps
do not depend on their latents, so they are computed in one batched decoder
call and served to the pipeline's later UNet calls one by one (the pipeline
keeps its loop: ``scheduler.step``, callbacks and ``interrupt`` still work).
Prior noise injection is its own strategy, ``prior-noise``, which composes.

Steps are counted by denoiser calls and ``scheduler.order`` (the adapter's
``step``), never by looking up timestep values. A ControlNet runs only at key
steps; at other steps its call is served with its last output, which the
served UNet call ignores.

Reproduced: key steps equal to the baseline bit for bit, the parallel decoder
equal to the sequential one (tests/test_faster_diffusion.py); speed-up against
the FLOP-ideal one and fidelity beside DeepCache (docs/benchmarks.md, section
Faster-Diffusion; benchmarks/faster_diffusion_vs_deepcache.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from decodekit.errors import AttachError
from decodekit.feature_memo import StepFeatureMemo
from decodekit.hookspecs import hookimpl
from decodekit.strategy import Params
from decodekit.unet_reuse import (
    UNetReuseStrategy,
    count_flops,
    refuse_steps_past_end,
    solver_steps,
)
from pydantic import Field, field_validator

PAPER_KEY_STEPS_50 = (0, 1, 2, 3, 5, 10, 15, 25, 35)
"""The paper's key steps for 50 DDIM steps."""

_UNIFORM = re.compile(r"^uniform-([1-9][0-9]*)$")


def key_steps_for(spec: str | list[int], num_steps: int) -> list[int]:
    """The sorted key steps (solver-step indices in ``range(num_steps)``) of schedule ``spec``.

    ``paper`` / ``paper-50``: the paper's 50-step preset, mapped to ``num_steps``
    by rounding ``k · num_steps / 50`` (identical to the preset at 50 steps);
    ``uniform-N``: every N-th step from 0; ``all``: every step; a list: those
    steps (0 is always a key step: nothing is cached before it).
    """
    if isinstance(spec, list):
        steps = set(spec)
    elif spec in ("paper", "paper-50"):
        steps = {math.floor(k * num_steps / 50 + 0.5) for k in PAPER_KEY_STEPS_50}
    elif spec == "all":
        steps = set(range(num_steps))
    else:
        m = _UNIFORM.match(spec)
        assert m is not None, spec  # the params validator only lets these through
        steps = set(range(0, num_steps, int(m.group(1))))
    return sorted(s for s in steps | {0} if s < num_steps)


class FasterDiffusionParams(Params):
    """Parameters of `faster-diffusion`."""

    key_steps: str | list[int] = Field(
        "paper",
        description=(
            "Which solver steps run the full UNet: 'paper' (the paper's 50-step preset "
            "[0,1,2,3,5,10,15,25,35], mapped to the actual step count), 'uniform-N' (every "
            "N-th step), 'all' (every step: identical to the baseline), or a list of step "
            "indices that includes 0."
        ),
    )
    parallel_decoder: bool = Field(
        True,
        description=(
            "Compute the decoder for consecutive non-key steps in one batched call (off: "
            "one decoder-only call per step)."
        ),
    )
    max_group: int = Field(
        8,
        ge=1,
        description=(
            "Most non-key steps decoded in one batched call; memory of that call grows "
            "linearly with it."
        ),
    )

    @field_validator("key_steps")
    @classmethod
    def _check_key_steps(cls, v: str | list[int]) -> str | list[int]:
        if isinstance(v, list):
            if not v or any(s < 0 for s in v):
                raise ValueError("a key-step list needs non-negative step indices, e.g. [0, 2, 5]")
            if 0 not in v:
                raise ValueError("a key-step list must include step 0: nothing is cached before it")
            return sorted(set(v))
        if v in ("paper", "paper-50", "all") or _UNIFORM.match(v):
            return v
        raise ValueError(
            f"unknown key-step schedule {v!r}; use 'paper', 'paper-50', 'all', 'uniform-N' "
            "(N >= 1) or a list of step indices"
        )


@dataclass
class DecoderInputs:
    """What the UNet's decoder read at a key step: the cached encoder features.

    ``hidden`` is the first up block's input, the mid-block output plus any
    ControlNet mid residual, (B, C_mid, h, w). ``blocks[i]`` holds the keyword
    arguments up block ``i`` was called with that come from the encoder: its skip
    residuals ``res_hidden_states_tuple`` (ControlNet residuals added),
    ``upsample_size``, and the prepared attention masks.
    """

    hidden: torch.Tensor
    blocks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def batch(self) -> int:
        return self.hidden.shape[0]


def _repeat(x: Any, n: int) -> Any:
    """Repeat a batch-first tensor ``n`` times along the batch, step-major: (B, ...) -> (n·B, ...)."""
    if n == 1 or not torch.is_tensor(x):
        return x
    return x.repeat(n, *([1] * (x.ndim - 1)))


def decoder_forward(
    unet: torch.nn.Module,
    feats: DecoderInputs,
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    added_cond_kwargs: dict[str, Any] | None = None,
    timestep_cond: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Run only the decoder of a `UNet2DConditionModel` on cached encoder features, for G steps at once.

    Args:
        unet: the UNet whose up blocks and output layers run.
        feats: the encoder features of one key step, batch B.
        timesteps: (G·B,) the timestep of every output row, step-major
            (rows ``g·B … g·B + B − 1`` are step g).
        encoder_hidden_states: (B, L, D) text embeddings, the same for every step.
        added_cond_kwargs, timestep_cond, class_labels: the UNet call's other
            conditioning (SDXL's ``text_embeds``/``time_ids`` …), batch B.
        cross_attention_kwargs: passed to the cross-attention processors as is.

    Returns:
        (G·B, C_out, H, W): the noise prediction of each step, as the full UNet
        would give with these encoder features.
    """
    n = timesteps.shape[0] // feats.batch  # G, steps decoded at once
    dtype = feats.hidden.dtype
    encoder_hidden_states = _repeat(encoder_hidden_states, n)  # (G·B, L, D)
    added = {k: _repeat(v, n) for k, v in (added_cond_kwargs or {}).items()}

    # The time embedding, as UNet2DConditionModel.forward builds it.
    t_emb = unet.time_proj(timesteps).to(dtype)  # (G·B, C_t); time_proj always returns f32
    emb = unet.time_embedding(t_emb, _repeat(timestep_cond, n))  # (G·B, C_emb)
    class_emb = unet.get_class_embed(sample=emb, class_labels=_repeat(class_labels, n))
    if class_emb is not None:
        if unet.config.class_embeddings_concat:
            emb = torch.cat([emb, class_emb], dim=-1)
        else:
            emb = emb + class_emb
    aug_emb = unet.get_aug_embed(
        emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added
    )
    if isinstance(aug_emb, tuple):  # image_hint: (aug_emb, hint); the hint only feeds conv_in
        aug_emb = aug_emb[0]
    if aug_emb is not None:
        emb = emb + aug_emb  # SDXL: text_embeds and time_ids enter here
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added
    )

    sample = _repeat(feats.hidden, n)  # (G·B, C_mid, h, w)
    for block, cached in zip(unet.up_blocks, feats.blocks):
        res = tuple(_repeat(r, n) for r in cached["res_hidden_states_tuple"])
        if getattr(block, "has_cross_attention", False):
            sample = block(
                hidden_states=sample,
                temb=emb,
                res_hidden_states_tuple=res,
                encoder_hidden_states=encoder_hidden_states,
                cross_attention_kwargs=cross_attention_kwargs,
                upsample_size=cached.get("upsample_size"),
                attention_mask=_repeat(cached.get("attention_mask"), n),
                encoder_attention_mask=_repeat(cached.get("encoder_attention_mask"), n),
            )
        else:
            sample = block(
                hidden_states=sample,
                temb=emb,
                res_hidden_states_tuple=res,
                upsample_size=cached.get("upsample_size"),
            )
        # (G·B, C_i, 2h, 2w) after each upsampling block
    if unet.conv_norm_out is not None:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)  # (G·B, C_out, H, W)


class FasterDiffusion(UNetReuseStrategy):
    """Run the UNet's encoder only at key steps; decode the other steps from its cached features."""

    name = "faster-diffusion"
    loops = ("continuous-denoising",)
    Params = FasterDiffusionParams
    slot = "denoiser-cache"
    paper = "Faster Diffusion: Rethinking the Role of UNet Encoder in Diffusion Models, arXiv:2312.09608"
    served_count = "decoder_calls"
    batch_count = "decoder_batches"

    def __init__(self, params=None, *, path: str = "params", **kwargs):
        super().__init__(params, path=path, **kwargs)
        self.counts: dict[str, int] = {}  # per call, from reset()
        self._key: list[int] | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def on_attach(self, run) -> None:
        from diffusers import UNet2DConditionModel

        unet = run.adapter.denoiser
        if not isinstance(unet, UNet2DConditionModel):
            raise AttachError(
                f"faster-diffusion needs a pipeline whose denoiser is a UNet2DConditionModel, "
                f"got {type(unet).__name__}: it reuses the UNet encoder's features in the "
                "decoder's skip connections, and a diffusion transformer has no encoder/decoder "
                "split. Use it on a stable-diffusion pipeline."
            )
        self._attach_unet(unet)
        self._capturing = False
        self._captured: list[dict[str, Any] | None] = []
        self._handles = [
            block.register_forward_pre_hook(self._capture_hook(i), with_kwargs=True)
            for i, block in enumerate(unet.up_blocks)
        ]
        self.reset(run)

    def on_detach(self, run) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._capturing = False
        self._served = {}
        # The last key step's features and call stay referenced by this strategy
        # (not by the pipeline) so that ideal_speedup works after detach.

    def reset(self, run) -> None:
        self._key: list[int] | None = None  # key solver steps of this call
        # The decoder inputs of the last full UNet call, under its call index.
        self.features = StepFeatureMemo(max_steps=1)
        self._reset_serving()

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "key_steps": list(self._key or [])}

    # -- the key-step schedule ----------------------------------------------------------
    def _key_steps(self, run) -> list[int]:
        if self._key is None:
            num_steps = solver_steps(run, "faster-diffusion")
            spec = self.params.key_steps
            if isinstance(spec, list):
                refuse_steps_past_end("faster-diffusion params.key_steps", spec, num_steps)
            self._key = key_steps_for(spec, num_steps)
        return self._key

    def is_key(self, run, step: int) -> bool:
        """Whether denoiser call ``step`` belongs to a key solver step."""
        return step // run.adapter.scheduler_order in self._key_steps(run)

    # -- capturing the decoder's inputs at full calls ------------------------------------
    def _capture_hook(self, index: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if not self._capturing:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            self._captured[index] = {
                "hidden": hidden,
                "res_hidden_states_tuple": kwargs.get(
                    "res_hidden_states_tuple", args[1] if len(args) > 1 else None
                ),
                "upsample_size": kwargs.get("upsample_size"),
                "attention_mask": kwargs.get("attention_mask"),
                "encoder_attention_mask": kwargs.get("encoder_attention_mask"),
            }

        return hook

    # -- what UNetReuseStrategy's denoiser hooks ask ----------------------------------------
    def _is_full(self, run, step: int) -> bool:
        return self.is_key(run, step)

    def _skips_controlnet(self, run, step: int) -> bool:
        return self._key_inputs(step) is not None and not self.is_key(run, step)

    def _start_full(self) -> None:
        self._capturing = True
        self._captured = [None] * len(self.unet.up_blocks)

    def _end_full(self, step: int, args: tuple, kwargs: dict[str, Any]) -> None:
        self._capturing = False
        captured, self._captured = self._captured, []
        if captured and all(c is not None for c in captured):
            feats = DecoderInputs(hidden=captured[0]["hidden"], blocks=captured)
            self.features.put(step, "decoder_inputs", feats)
        else:
            self.features.clear()  # nothing to serve the next calls from

    def _serve(self, run, step: int, call: dict[str, Any]) -> None:
        self._decode_group(run, step, call)

    def _has_features(self) -> bool:
        return self._key_inputs() is not None

    # -- serving non-key steps ----------------------------------------------------------
    def _key_inputs(self, step: int | None = None) -> DecoderInputs | None:
        """The decoder inputs of the last full UNet call at or before call ``step`` (or at all)."""
        return self.features.latest("decoder_inputs", at_or_before=step, default=None)

    def _can_serve(self, call: dict[str, Any], step: int) -> bool:
        feats = self._key_inputs(step)
        if feats is None or call["sample"].shape[0] != feats.batch:
            return False
        cak = call.get("cross_attention_kwargs") or {}
        return "gligen" not in cak

    def _decode_group(self, run, step: int, call: dict[str, Any]) -> None:
        """Decode call ``step`` and, with the parallel decoder, the non-key calls after it in one batch."""
        feats = self._key_inputs(step)
        assert feats is not None
        b = feats.batch
        t_now = torch.as_tensor(call["timestep"], device=feats.hidden.device)
        if self.params.parallel_decoder:
            steps = self._group(run, step, t_now, self.params.max_group)
        else:
            steps = [step]
        timesteps = self._group_timesteps(run, steps, t_now, b)  # (G·B,), step-major
        out = decoder_forward(
            self.unet,
            feats,
            timesteps,
            call["encoder_hidden_states"],
            added_cond_kwargs=call.get("added_cond_kwargs"),
            timestep_cond=call.get("timestep_cond"),
            class_labels=call.get("class_labels"),
            cross_attention_kwargs=call.get("cross_attention_kwargs"),
        )  # (G·B, C, H, W)
        self._served_group(steps, out, b)

    # -- the FLOP-ideal speed-up --------------------------------------------------------
    def _measure_flops(self) -> tuple[int, int, int]:
        args, kwargs = self._last_full
        call = self._bind(args, kwargs)
        key = (tuple(call["sample"].shape), tuple(call["encoder_hidden_states"].shape))
        if key in self._flop_cache:
            return self._flop_cache[key]
        unet, feats = self.unet, self._key_inputs()
        saved_capturing, self._capturing = self._capturing, False
        try:
            f_full = count_flops(lambda: type(unet).forward(unet, *args, **kwargs))
            t = torch.as_tensor(call["timestep"], device=feats.hidden.device)
            f_dec = count_flops(
                lambda: decoder_forward(
                    unet,
                    feats,
                    t.expand(feats.batch) if t.ndim == 0 else t,
                    call["encoder_hidden_states"],
                    added_cond_kwargs=call.get("added_cond_kwargs"),
                    timestep_cond=call.get("timestep_cond"),
                    class_labels=call.get("class_labels"),
                    cross_attention_kwargs=call.get("cross_attention_kwargs"),
                )
            )
            f_cn = self.control.flops()
        finally:
            self._capturing = saved_capturing
        self._flop_cache[key] = (f_full, f_dec, f_cn)
        return self._flop_cache[key]


@hookimpl
def decodekit_register_strategies(register):
    register(FasterDiffusion)
