"""Next-scale image generation: the VAR transformer, `VARPipeline` and its `ScaleDecoder`.

"Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale
Prediction" (Tian et al., arXiv:2404.02905; FoundationVision/VAR). An image is a
pyramid of token maps, ``patch_nums = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)`` on a
side, from a multi-scale residual VQ-VAE (`decodekit.pipelines.var_vq`). The
transformer predicts every token of scale ``si`` at once, attending to all
tokens of scales ``0 .. si`` (block-causal attention over scales):

* the first scale's input is the class embedding plus ``pos_start``; the input of
  scale ``si + 1`` is the accumulated feature map ``f_hat`` of scales ``0 .. si``,
  area-down-sampled to ``pn_{si+1}`` (the VQ's ``next_scale_input``), through
  ``word_embed``; every token adds its absolute position embedding (``pos_1LC``)
  and its scale's level embedding (``lvl_embed``);
* each block is self-attention and an MLP under adaptive layer norm: the class
  embedding gives per-block shift, scale and gate (``ada_lin``, or one shared
  projection plus per-block ``ada_gss`` with ``shared_aln``); with
  ``attn_l2_norm`` queries and keys are L2-normalised and queries scaled by a
  learned per-head factor (at most 100); the head is preceded by adaptive LN
  (``head_nm``);
* sampling keeps each block's keys and values per scale (`ScaleKVCache`), so a
  scale costs one forward of its own tokens.

Classifier-free guidance runs a doubled batch whose second half is the null
class (``num_classes``), with VAR's ramp: at scale ``si`` of ``K``,
``t = cfg * si / (K - 1)`` and the logits are ``(1 + t) * cond - t * uncond``,
i.e. `classifier_free_guidance` (convention ``"standard"``) at scale ``1 + t``.
Per scale, top-k, top-p and temperature (`decodekit.sampler.Sampler`, with the
temperature after top-k/top-p as VAR orders them, or before, a setting), one
``torch.Generator`` per row.

Module and parameter names follow VAR's ``models/var.py`` and
``models/basic_var.py``, so a released ``var_d*.pth`` state dict loads after its
three buffers are dropped (`VARTransformer.load_official_state_dict`;
``decodekit convert-var`` writes the folder). The code is written here, not
copied. The scale loop lives in `ScaleDecoder`; a strategy chooses which model
runs which scale through ``decodekit_scale_models(run, plan)`` (a `ScalePlan`),
and the decoder hands a model that did not run the previous scale one
block-causal prefill over all earlier scales. Its adapter, ``var``, is in
``decodekit.pipelines.var_adapter``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from decodekit.logits_processors import classifier_free_guidance
from decodekit.sampler import Sampler, check_generator, sample_categorical
from decodekit.session import attached_run
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

__all__ = [
    "OFFICIAL_BUFFERS",
    "ScaleDecoder",
    "ScaleKVCache",
    "ScalePlan",
    "VAROutput",
    "VARPipeline",
    "VARTransformer",
    "guidance_ramp",
]

CONFIG_NAME = "var.json"
"""The pipeline-level file of a var folder (class names); the models are in ``transformer/`` and ``vq/``."""

OFFICIAL_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias")
"""Buffers of VAR's state dict that decodekit recomputes (the last one per block)."""

MAX_SCALE_MUL = math.log(100.0)
"""VAR caps the learned query scale of ``attn_l2_norm`` at 100."""


def guidance_ramp(cfg: float, scale: int, num_scales: int) -> float:
    """VAR's guidance weight ``t = cfg * si / (K - 1)`` at scale ``si`` of ``K`` (logits ``(1+t)c - t*u``)."""
    return cfg * scale / max(1, num_scales - 1)


# ---------------------------------------------------------------------------------------- cache
class ScaleKVCache:
    """Keys and values of every block for the scales one model has seen in a call.

    ``keys[i]``/``values[i]`` are block ``i``'s ``(B, H, n, c)``, ``n`` the tokens of
    the scales cached so far; ``lengths[s]`` the tokens of scale ``s``. `crop`
    forgets the scales from ``num_scales`` on.
    """

    def __init__(self, depth: int):
        self.keys: list[Tensor | None] = [None] * depth
        self.values: list[Tensor | None] = [None] * depth
        self.lengths: list[int] = []

    @property
    def num_scales(self) -> int:
        """Scales whose K/V are cached."""
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        """Tokens whose K/V are cached (every cached scale's)."""
        return sum(self.lengths)

    def extend(self, block: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append block ``block``'s new ``k``/``v`` ``(B, H, l, c)``; return all of them ``(B, H, n+l, c)``."""
        if self.keys[block] is not None:
            k = torch.cat((self.keys[block], k), dim=2)
            v = torch.cat((self.values[block], v), dim=2)
        self.keys[block], self.values[block] = k, v
        return k, v

    def crop(self, num_scales: int) -> None:
        """Keep the first ``num_scales`` scales only."""
        self.lengths = self.lengths[:num_scales]
        n = self.num_tokens
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k[:, :, :n], v[:, :, :n]


# ---------------------------------------------------------------------------------------- blocks
class SelfAttention(nn.Module):
    """VAR's attention: fused QKV with q/v biases, optional L2-normalised q/k with a learned scale."""

    def __init__(self, embed_dim: int, num_heads: int, attn_l2_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, embed_dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(
        self, x: Tensor, mask: Tensor | None, cache: ScaleKVCache | None, block: int
    ) -> Tensor:
        B, L, C = x.shape
        bias = torch.cat(
            (self.q_bias, torch.zeros_like(self.q_bias), self.v_bias)
        )  # the key has none
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, c)
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()  # (1, H, 1, 1)
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.extend(block, k, v)  # (B, H, n + L, c)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))  # (B, L, C)


class FFN(nn.Module):
    """Linear, tanh-approximated GELU, linear."""

    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AdaLNSelfAttn(nn.Module):
    """One VAR block: attention and MLP, each under class-conditioned shift/scale and a gate."""

    def __init__(self, config: Any):
        super().__init__()
        C = config.embed_dim
        self.C = C
        self.shared_aln = config.shared_aln
        self.attn = SelfAttention(C, config.num_heads, config.attn_l2_norm)
        self.ffn = FFN(C, round(C * config.mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(C, eps=config.norm_eps, elementwise_affine=False)
        if config.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(
        self, x: Tensor, cond: Tensor, mask: Tensor | None, cache: ScaleKVCache | None, block: int
    ) -> Tensor:
        # cond: (B, D) class embeddings, or (B, 1, 6, C) from the shared projection
        if self.shared_aln:
            mods = (self.ada_gss + cond).unbind(2)  # 6 x (B, 1, C)
        else:
            mods = self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods
        h = self.ln_wo_grad(x).mul(scale1.add(1)).add(shift1)
        x = x + self.attn(h, mask, cache, block).mul(gamma1)
        h = self.ln_wo_grad(x).mul(scale2.add(1)).add(shift2)
        return x + self.ffn(h).mul(gamma2)  # (B, L, C)


class AdaLNBeforeHead(nn.Module):
    """Adaptive layer norm before the output head."""

    def __init__(self, C: int, eps: float):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        # in x's dtype (float32 at least, as VAR runs its head) whatever the weights' dtype
        lin, dtype = self.ada_lin[1], x.dtype
        mod = F.linear(F.silu(cond.to(dtype)), lin.weight.to(dtype), lin.bias.to(dtype))
        scale, shift = mod.view(-1, 1, 2, self.C).unbind(2)  # (B, 1, C) each
        return self.ln_wo_grad(x).mul(scale.add(1)).add(shift)


class SharedAdaLin(nn.Linear):
    """The one projection of class embeddings into every block's six modulations (``shared_aln``)."""

    def forward(self, cond: Tensor) -> Tensor:
        return super().forward(cond).view(-1, 1, 6, self.weight.shape[0] // 6)  # (B, 1, 6, C)


# ---------------------------------------------------------------------------------------- model
class VARTransformer(ModelMixin, ConfigMixin):
    """VAR's class-conditional next-scale transformer, in VAR's state-dict layout.

    Args:
        num_classes: classes; class ``num_classes`` is the null class of guidance.
        depth: blocks.
        embed_dim: width C (VAR-d{depth} uses ``64 * depth``).
        num_heads: attention heads (VAR-d{depth} uses ``depth``).
        mlp_ratio: MLP width over C.
        norm_eps: layer-norm epsilon.
        shared_aln: one shared modulation projection plus per-block ``ada_gss``.
        attn_l2_norm: L2-normalised queries and keys with a learned per-head scale
            (the released checkpoints use it).
        patch_nums: side of each scale's token map, first to last.
        vocab_size: V, the VQ codebook size.
        vae_embed_dim: Cvae, the VQ codebook's vector size.
        cond_drop_rate: training's class-dropout probability (`drop_labels`); unused
            when sampling.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        num_classes: int = 1000,
        depth: int = 16,
        embed_dim: int = 1024,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        shared_aln: bool = False,
        attn_l2_norm: bool = True,
        patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        vocab_size: int = 4096,
        vae_embed_dim: int = 32,
        cond_drop_rate: float = 0.1,
    ):
        super().__init__()
        check_config(self.config)
        C, pn = embed_dim, tuple(int(p) for p in patch_nums)
        L, first = sum(p * p for p in pn), pn[0] ** 2
        std = math.sqrt(1 / C / 3)
        self.word_embed = nn.Linear(vae_embed_dim, C)
        self.class_emb = nn.Embedding(num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.empty(1, first, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        self.lvl_embed = nn.Embedding(len(pn), C)
        for p in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(p.data, mean=0.0, std=std)
        if shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C))
        else:
            self.shared_ada_lin = nn.Identity()
        self.blocks = nn.ModuleList(AdaLNSelfAttn(self.config) for _ in range(depth))
        self.head_nm = AdaLNBeforeHead(C, norm_eps)
        self.head = nn.Linear(C, vocab_size)

    # -- layout ----------------------------------------------------------------------------
    @property
    def patch_nums(self) -> tuple[int, ...]:
        """Side of each scale's token map."""
        return tuple(int(p) for p in self.config.patch_nums)

    @property
    def num_scales(self) -> int:
        """K, the number of scales."""
        return len(self.config.patch_nums)

    @property
    def begin_ends(self) -> list[tuple[int, int]]:
        """Token span ``[begin, end)`` of each scale in the whole sequence."""
        out, cur = [], 0
        for p in self.patch_nums:
            out.append((cur, cur + p * p))
            cur += p * p
        return out

    @property
    def seq_len(self) -> int:
        """L, the tokens of all scales."""
        return self.begin_ends[-1][1]

    def levels(self, device: torch.device | None = None) -> Tensor:
        """The scale of each token position, ``(L,)`` long."""
        return torch.cat(
            [torch.full((p * p,), i, dtype=torch.long) for i, p in enumerate(self.patch_nums)]
        ).to(device)

    # -- pieces the loop and training share ------------------------------------------------------
    def drop_labels(self, class_labels: Tensor, generator: torch.Generator) -> Tensor:
        """Training's class dropout: each label becomes the null class with ``cond_drop_rate``."""
        u = torch.rand(class_labels.shape, generator=generator, device=class_labels.device)
        return torch.where(u < self.config.cond_drop_rate, self.config.num_classes, class_labels)

    def embed_scales(
        self, class_emb: Tensor, inputs: Tensor | None, first: int, last: int
    ) -> Tensor:
        """Token embeddings of scales ``first .. last - 1``, ``(B, l, C)``.

        ``class_emb`` ``(B, C)`` gives scale 0's tokens; ``inputs`` ``(B, l', Cvae)``
        are the next-scale inputs of the scales from ``max(first, 1)`` on (None when
        the span is scale 0 alone).
        """
        begin, end = self.begin_ends[first][0], self.begin_ends[last - 1][1]
        B = class_emb.shape[0]
        lvl_pos = (
            self.lvl_embed(self.levels(class_emb.device)[begin:end]) + self.pos_1LC[0, begin:end]
        )
        parts = []
        if first == 0:
            first_l = self.patch_nums[0] ** 2
            sos = class_emb.unsqueeze(1).expand(B, first_l, -1) + self.pos_start.expand(B, -1, -1)
            parts.append(sos)
        if last > max(first, 1):
            want = self.begin_ends[last - 1][1] - self.begin_ends[max(first, 1)][0]
            if inputs is None or inputs.shape[:2] != (B, want):
                got = None if inputs is None else tuple(inputs.shape)
                raise ValueError(
                    f"scales {max(first, 1)}..{last - 1} need next-scale inputs "
                    f"(B, {want}, {self.config.vae_embed_dim}) = ({B}, {want}, "
                    f"{self.config.vae_embed_dim}), got {got}."
                )
            parts.append(self.word_embed(inputs.to(self.word_embed.weight.dtype)))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return x + lvl_pos.unsqueeze(0)  # (B, l, C)

    def logits_for_scales(
        self,
        class_emb: Tensor,
        inputs: Tensor | None,
        first: int,
        last: int,
        cache: ScaleKVCache | None = None,
    ) -> Tensor:
        """Logits ``(B, l, V)`` of the tokens of scales ``first .. last - 1``.

        Each token attends to every token of its own and earlier scales: those
        in the span (block-causal over the span's scales) and, with ``cache``,
        the cached ones of scales ``0 .. first - 1``, whose K/V the span then
        joins. Without a cache the span must start at scale 0.
        """
        cached = cache.num_scales if cache is not None else 0
        if cached != first or not (0 <= first < last <= self.num_scales):
            raise ValueError(
                f"cannot run scales {first}..{last - 1} of {self.num_scales} with "
                f"{cached} scales cached; a span starts where the cache ends."
            )
        x = self.embed_scales(class_emb, inputs, first, last)
        mask = None
        if last - first > 1:  # several scales at once: block-causal within the span
            levels = self.levels(x.device)
            q = levels[self.begin_ends[first][0] : self.begin_ends[last - 1][1]]
            k = levels[: self.begin_ends[last - 1][1]]
            mask = k.unsqueeze(0) <= q.unsqueeze(1)  # (l, n + l), True where attended
        cond = self.shared_ada_lin(class_emb)
        for i, block in enumerate(self.blocks):
            x = block(x, cond, mask, cache, i)
        if cache is not None:
            cache.lengths += [p * p for p in self.patch_nums[first:last]]
        work = torch.promote_types(x.dtype, torch.float32)  # VAR computes the head in float32
        h = self.head_nm(x.to(work), class_emb)
        return F.linear(h, self.head.weight.to(work), self.head.bias.to(work))  # (B, l, V)

    def forward(self, class_labels: Tensor, teacher_inputs: Tensor | None) -> Tensor:
        """Teacher-forced logits ``(B, L, V)`` of every scale, in one block-causal pass.

        Args:
            class_labels: ``(B,)`` long, in ``[0, num_classes]`` (``num_classes`` is
                the null class; training drops labels to it with `drop_labels`).
            teacher_inputs: ``(B, L - pn_0**2, Cvae)``, the next-scale inputs of
                scales 1 .. K-1 (the VQ's ``teacher_inputs`` of the token maps).

        The targets of the logits are the token maps concatenated ``(B, L)``;
        `VARPipeline.teacher_forced` returns both.
        """
        labels = check_labels(class_labels, self.config.num_classes, null_ok=True)
        labels = labels.to(self.class_emb.weight.device)
        return self.logits_for_scales(self.class_emb(labels), teacher_inputs, 0, self.num_scales)

    # -- the official layout -------------------------------------------------------------------
    def load_official_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load a state dict in VAR's layout (``var_d*.pth``): its buffers are dropped, the rest must match exactly."""
        own = self.state_dict()
        weights = {
            k: v for k, v in state_dict.items() if k.rsplit(".", 1)[-1] not in OFFICIAL_BUFFERS
        }
        missing = sorted(set(own) - set(weights))
        unknown = sorted(set(weights) - set(own))
        bad = [
            f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})"
            for k, v in weights.items()
            if k in own and tuple(v.shape) != tuple(own[k].shape)
        ]
        if missing or unknown or bad:
            raise ValueError(
                "the state dict does not fit this VAR config: "
                + "; ".join(
                    f"{what}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
                    for what, items in (("missing", missing), ("unknown", unknown), ("shape", bad))
                    if items
                )
                + ". Check depth, embed_dim, num_heads, patch_nums, shared_aln and attn_l2_norm."
            )
        self.load_state_dict(weights, strict=True)


def check_config(config: Any) -> None:
    """Refuse a VAR config that cannot build, naming the value."""
    pn = list(config.patch_nums)
    problems = []
    if not pn or any(not isinstance(p, int) or isinstance(p, bool) or p < 1 for p in pn):
        problems.append(f"patch_nums must be positive ints, got {pn}")
    elif pn != sorted(pn):
        problems.append(f"patch_nums must not decrease, got {pn}")
    for name in ("num_classes", "depth", "embed_dim", "num_heads", "vocab_size", "vae_embed_dim"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{name} must be an int >= 1, got {value!r}")
    if not problems and config.embed_dim % config.num_heads:
        problems.append(
            f"embed_dim ({config.embed_dim}) must be divisible by num_heads ({config.num_heads})"
        )
    if problems:
        raise ValueError("VARTransformer: " + "; ".join(problems) + ".")


def check_labels(labels: Any, num_classes: int, *, null_ok: bool = False) -> Tensor:
    """Class labels as a ``(B,)`` long tensor, each in ``[0, num_classes)`` (or the null class)."""
    top = num_classes + 1 if null_ok else num_classes
    if isinstance(labels, Tensor):
        ok = labels.dim() == 1 and not labels.is_floating_point() and labels.dtype != torch.bool
        t = labels.long() if ok else None
    else:
        rows = [labels] if isinstance(labels, int) else list(labels)
        ok = all(isinstance(c, int) and not isinstance(c, bool) for c in rows)
        t = torch.tensor(rows, dtype=torch.long) if ok else None
    if t is None or t.numel() == 0 or bool(((t < 0) | (t >= top)).any()):
        null = f" ({num_classes}: the null class)" if null_ok else ""
        raise ValueError(
            f"class labels must be a non-empty list of ints in [0, {top - 1}]{null}, "
            f"got {labels if not isinstance(labels, Tensor) else tuple(labels.shape)!r}."
        )
    return t


# ---------------------------------------------------------------------------------------- the loop
@dataclass
class ScalePlan:
    """Which model runs which scale in one call; ``decodekit_scale_models`` edits it in place.

    Attributes:
        models: one `VARTransformer` per scale, first to last; by default the
            pipeline's transformer everywhere. Every model must share the VQ's
            ``patch_nums``, ``vocab_size`` and ``vae_embed_dim`` and the pipeline's
            ``num_classes``. A model that did not run the scale before its first
            one gets one block-causal prefill over all earlier scales (and its own
            entry scale), after the previous model's cache is freed.
    """

    models: list[Any]


@dataclass
class VAROutput:
    """What a `VARPipeline` call returns."""

    images: list[Any] | None
    """PIL images, one per row; None with ``output_type="tokens"``."""
    token_maps: list[Tensor]
    """Long ``(B, pn*pn)`` per scale, first to last: the sampled token maps."""
    f_hat: Tensor
    """``(B, Cvae, pn_K, pn_K)``: the accumulated feature map the VQ decodes."""
    forwards: int = 0
    """Transformer forwards of the call (a guided batch's is one; a prefill is one)."""
    stats: dict[str, Any] = field(default_factory=dict)
    """``stats["models"][name]``: each model's ``forwards``, ``prefills``, ``scales`` and
    ``seconds`` (its forwards' wall time, synchronised on CUDA); names from
    `ScaleDecoder.model_name`."""


class ScaleDecoder:
    """One call's scale autoregression: the token maps so far, ``f_hat``, and each model's cache.

    ``B`` rows (under guidance the null-class copies are hidden inside). Scales
    run in order with `run_scale`; a model that did not run the previous scale
    is prefilled over all earlier ones first (the previous model's cache freed
    before), so any model can take over at any scale and sample on from the
    same generators.

    Attributes:
        pipe: the `VARPipeline`.
        class_labels: ``(B,)`` long.
        cfg: VAR's guidance ratio (0 runs no null-class rows).
        samplers: one `Sampler` per scale.
        generators: one ``torch.Generator`` per row, or None when every scale is greedy.
        more_smooth: VAR's visualisation mode (Gumbel-softmax embeddings of the logits).
        token_maps: the sampled ``(B, pn*pn)`` maps of the scales done.
        inputs: ``(B, pn_{s}**2, Cvae)`` next-scale input of each scale ``s >= 1`` made so far.
        f_hat: ``(B, Cvae, pn_K, pn_K)`` accumulated features.
        scale: the next scale to run (scales done).
        model: the model whose cache is live, or None; ``cache`` its `ScaleKVCache`.
        forwards: transformer forwards so far; ``stats`` per model.
        run: the attached run, whose ``nfe`` counts the forwards too, or None.
    """

    def __init__(
        self,
        pipe: VARPipeline,
        class_labels: Tensor,
        *,
        cfg: float,
        samplers: list[Sampler],
        generators: list[torch.Generator] | None,
        more_smooth: bool = False,
        run: Any = None,
    ):
        self.pipe = pipe
        self.run = run
        self.class_labels = class_labels
        self.cfg = float(cfg)
        self.samplers = samplers
        self.generators = generators
        self.more_smooth = more_smooth
        self.patch_nums = pipe.patch_nums
        self.batch = class_labels.shape[0]
        vq = pipe.vq
        last = self.patch_nums[-1]
        dtype = next(vq.parameters()).dtype
        self.f_hat = torch.zeros(
            self.batch, vq.embed_dim, last, last, device=class_labels.device, dtype=dtype
        )
        self.token_maps: list[Tensor] = []
        self.inputs: list[Tensor] = []
        self.scale = 0
        self.model: Any = None
        self.cache: ScaleKVCache | None = None
        self.forwards = 0
        self.stats: dict[str, Any] = {"models": {}}
        self._names: dict[int, str] = {}

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def guided(self) -> bool:
        """Whether the null-class rows run (``cfg != 0``)."""
        return self.cfg != 0

    def model_name(self, model: Any) -> str:
        """``"transformer"`` for the pipeline's model, else ``"model-1"``, ``"model-2"`` … in order of first use."""
        if model is self.pipe.transformer:
            return "transformer"
        return self._names.setdefault(id(model), f"model-{len(self._names) + 1}")

    def _class_emb(self, model: Any) -> Tensor:
        labels = self.class_labels
        if self.guided:
            null = torch.full_like(labels, model.config.num_classes)
            labels = torch.cat((labels, null))  # (2B,)
        return model.class_emb(labels)

    def _doubled(self, x: Tensor | None) -> Tensor | None:
        return None if x is None or not self.guided else torch.cat((x, x))

    def logits(self, model: Any) -> Tensor:
        """The guided logits ``(B, pn*pn, V)`` of the next scale under ``model`` (one forward)."""
        si = self.scale
        self.pipe.check_model(model)
        entry = model is not self.model
        if entry:  # free the previous model's K/V before the new one's prefill
            self.model = self.cache = None
            self.model, self.cache = model, ScaleKVCache(len(model.blocks))
            first = 0
            inputs = torch.cat(self.inputs, dim=1) if self.inputs else None
        else:
            first = si
            inputs = self.inputs[si - 1] if si > 0 else None
        if inputs is not None and self.guided:
            inputs = self._doubled(inputs)
        start = time.perf_counter()
        logits = model.logits_for_scales(self._class_emb(model), inputs, first, si + 1, self.cache)
        logits = logits[:, -(self.patch_nums[si] ** 2) :]  # this scale's tokens
        if logits.is_cuda:  # the seconds are the model's, not its kernel launches'
            torch.cuda.synchronize(logits.device)
        per = self.stats["models"].setdefault(
            self.model_name(model), {"forwards": 0, "prefills": 0, "scales": 0, "seconds": 0.0}
        )
        per["forwards"] += 1
        per["prefills"] += int(entry and si > 0)
        per["scales"] += 1
        per["seconds"] += time.perf_counter() - start
        self.forwards += 1
        if self.run is not None:
            self.run.nfe += 1
        if not self.guided:
            return logits
        t = guidance_ramp(self.cfg, si, self.num_scales)
        cond, uncond = logits.chunk(2)
        return classifier_free_guidance(cond, uncond, 1 + t)  # (1+t)*cond - t*uncond

    def sample(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens ``(B, l)`` and their embeddings ``(B, l, Cvae)`` from guided logits, row by row."""
        sampler = self.samplers[self.scale]
        probs = sampler.probs(logits)  # (B, l, V)
        if sampler.greedy:
            tokens = probs.argmax(dim=-1)
        else:
            tokens = torch.stack(
                [sample_categorical(probs[b], self.generators[b]) for b in range(self.batch)]
            )  # (B, l)
        vq = self.pipe.vq
        if not self.more_smooth:
            return tokens, vq.embed(tokens)
        # VAR's visualisation mode: a Gumbel-softmax mixture of codebook vectors
        ratio = self.scale / max(1, self.num_scales - 1)
        tau = max(0.27 * (1 - ratio * 0.95), 0.005)
        processed = sampler.chain()(logits.float()) * (1 + ratio)
        rows = []
        for b in range(self.batch):
            gen = self.generators[b] if self.generators else None
            check_generator(gen, logits, "more_smooth")
            noise = torch.empty_like(processed[b]).exponential_(generator=gen).log().neg()
            rows.append(((processed[b] + noise) / tau).softmax(dim=-1))
        codebook = vq.embed(torch.arange(vq.vocab_size, device=logits.device)[None])[0]  # (V, Cvae)
        return tokens, torch.stack(rows).to(codebook.dtype) @ codebook

    def run_scale(self, model: Any) -> Tensor:
        """Run the next scale with ``model``: sample its tokens ``(B, pn*pn)`` and advance ``f_hat``."""
        if self.scale >= self.num_scales:
            raise ValueError(f"all {self.num_scales} scales are done.")
        tokens, emb = self.sample(self.logits(model))
        self.accept(tokens, emb)
        return tokens

    def accept(self, tokens: Tensor, emb: Tensor | None = None) -> None:
        """Append scale ``scale``'s tokens ``(B, pn*pn)``: ``f_hat`` and the next scale's input advance."""
        si, pn = self.scale, self.patch_nums[self.scale]
        vq = self.pipe.vq
        emb = vq.embed(tokens) if emb is None else emb  # (B, l, Cvae)
        h = emb.transpose(1, 2).reshape(self.batch, -1, pn, pn).to(self.f_hat.dtype)
        self.f_hat, next_map = vq.next_scale_input(si, self.f_hat, h)
        self.token_maps.append(tokens)
        if si + 1 < self.num_scales:
            self.inputs.append(next_map.flatten(2).transpose(1, 2))  # (B, pn_{si+1}**2, Cvae)
        self.scale += 1
        if self.scale == self.num_scales:  # done: free the K/V
            self.model = self.cache = None


# ---------------------------------------------------------------------------------------- pipeline
def per_scale(value: Any, num_scales: int, name: str) -> list[Any]:
    """A sampling setting given once or per scale, as a list of ``num_scales``."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_scales:
            raise ValueError(
                f"{name} per scale needs {num_scales} values (one per scale), got {len(value)}."
            )
        return list(value)
    return [value] * num_scales


class VARPipeline:
    """Class-conditional next-scale generation with a `VARTransformer` and a multi-scale VQ-VAE.

    A folder holds ``transformer/`` (diffusers-style ``config.json`` and
    ``diffusion_pytorch_model.safetensors``), ``vq/`` (``MultiScaleVQVAE``) and
    optionally ``var.json`` with ``class_names`` (then a class may be named by
    its caption). ``decodekit convert-var`` writes one from VAR's released
    checkpoints.
    """

    def __init__(self, transformer: VARTransformer, vq: Any, class_names: list[str] | None = None):
        self.transformer = transformer.eval()
        self.vq = vq.eval() if hasattr(vq, "eval") else vq
        self.class_names = list(class_names) if class_names is not None else None
        self.decoder: ScaleDecoder | None = None
        self.check_model(transformer)
        if self.class_names is not None and len(self.class_names) != transformer.config.num_classes:
            raise ValueError(
                f"{len(self.class_names)} class names for {transformer.config.num_classes} classes."
            )

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_transformer(
        cls,
        vq: Any,
        *,
        num_classes: int,
        depth: int = 2,
        embed_dim: int = 64,
        num_heads: int = 4,
        class_names: list[str] | None = None,
        seed: int = 0,
        **config: Any,
    ) -> VARPipeline:
        """A pipeline with a freshly initialised transformer of this config on ``vq``'s layout.

        ``patch_nums``, ``vocab_size`` and ``vae_embed_dim`` come from ``vq``; the other
        `VARTransformer` arguments may be given. Weights are drawn from ``seed`` with a
        generator of their own (torch's global RNG is left as it was).
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer = VARTransformer(
                num_classes=num_classes,
                depth=depth,
                embed_dim=embed_dim,
                num_heads=num_heads,
                patch_nums=tuple(vq.patch_nums),
                vocab_size=vq.vocab_size,
                vae_embed_dim=vq.embed_dim,
                **config,
            )
        dtype = next(vq.parameters()).dtype
        nn.Module.to(transformer, dtype)  # ModelMixin.to warns about float32 modules it has none of
        return cls(transformer, vq, class_names)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, torch_dtype: torch.dtype | None = None
    ) -> VARPipeline:
        """Load a var folder (``transformer/``, ``vq/``, optional ``var.json``)."""
        from decodekit.pipelines.var_vq import MultiScaleVQVAE

        folder = Path(folder)
        if not (folder / "transformer").is_dir() or not (folder / "vq").is_dir():
            raise ValueError(
                f"{folder} is not a var folder: it needs transformer/ and vq/ "
                "(`decodekit convert-var` writes one from VAR's released checkpoints)."
            )
        dtype = {"dtype": torch_dtype} if torch_dtype is not None else {}
        transformer = VARTransformer.from_pretrained(folder / "transformer", **dtype)
        vq = MultiScaleVQVAE.from_pretrained(folder / "vq", dtype=torch_dtype)
        names = None
        if (folder / CONFIG_NAME).is_file():
            names = json.loads((folder / CONFIG_NAME).read_text()).get("class_names")
        return cls(transformer, vq, names)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the folder `from_pretrained` reads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(folder / "transformer")
        self.vq.save_pretrained(folder / "vq")
        (folder / CONFIG_NAME).write_text(json.dumps({"class_names": self.class_names}, indent=1))

    def to(self, device: str | torch.device) -> VARPipeline:
        self.transformer.to(device)
        self.vq.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.vq.patch_nums)

    def check_model(self, model: Any) -> None:
        """Refuse a transformer that does not fit this pipeline's VQ and classes."""
        if not isinstance(model, VARTransformer):
            raise TypeError(f"a scale is run by a VARTransformer, got {type(model).__name__}.")
        cfg, vq = model.config, self.vq
        own = getattr(getattr(self, "transformer", None), "config", cfg)
        want = {
            "patch_nums": self.patch_nums,
            "vocab_size": vq.vocab_size,
            "vae_embed_dim": vq.embed_dim,
            "num_classes": own.num_classes,
        }
        got = {
            "patch_nums": tuple(cfg.patch_nums),
            "vocab_size": cfg.vocab_size,
            "vae_embed_dim": cfg.vae_embed_dim,
            "num_classes": cfg.num_classes,
        }
        wrong = [f"{k} {got[k]} (the pipeline has {want[k]})" for k in want if got[k] != want[k]]
        if wrong:
            raise ValueError(
                "this VARTransformer does not fit the pipeline: " + ", ".join(wrong) + "."
            )

    def class_ids(self, classes: Any) -> Tensor:
        """Class ids ``(B,)`` of ints or (with ``class_names``) captions."""
        rows = [classes] if isinstance(classes, (int, str)) else classes
        if not isinstance(rows, Tensor) and any(isinstance(c, str) for c in rows):
            names = self.class_names or []
            unknown = [c for c in rows if isinstance(c, str) and c not in names]
            if unknown:
                known = (
                    ", ".join(repr(n) for n in names[:8]) or "none: this model has no class_names"
                )
                raise ValueError(f"unknown class name {unknown[0]!r}; known: {known}.")
            rows = [names.index(c) if isinstance(c, str) else c for c in rows]
        return check_labels(rows, self.transformer.config.num_classes)

    # -- training -------------------------------------------------------------------------------
    def teacher_forced(
        self, class_labels: Tensor, token_maps: list[Tensor], model: VARTransformer | None = None
    ) -> tuple[Tensor, Tensor]:
        """Teacher-forced logits ``(B, L, V)`` and their targets ``(B, L)`` for ``token_maps``.

        ``token_maps`` are the VQ's ``img_to_idx`` of the images; the loss is
        ``F.cross_entropy(logits.flatten(0, 1), targets.flatten())``. Gradients flow
        into ``model`` (default: the pipeline's transformer).
        """
        model = self.transformer if model is None else model
        inputs = self.vq.teacher_inputs(token_maps)  # (B, L - pn_0**2, Cvae)
        return model(class_labels, inputs), torch.cat(token_maps, dim=1)

    # -- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels: Any,
        *,
        cfg: float = 1.5,
        top_k: int | None | Sequence[int | None] = None,
        top_p: float | None | Sequence[float | None] = None,
        temperature: float | Sequence[float] = 1.0,
        temperature_last: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
        more_smooth: bool = False,
        output_type: str = "pil",
    ) -> VAROutput:
        """Generate one image per class label.

        Args:
            class_labels: a class id or a list of them (or captions from
                ``class_names``).
            cfg: VAR's guidance ratio: at scale ``si`` the logits are
                ``(1+t)*cond - t*uncond``, ``t = cfg * si / (K-1)``; 0 is unguided.
            top_k: keep the k likeliest tokens (None: all); one value or one per scale.
            top_p: nucleus filtering (None: off); one value or one per scale.
            temperature: 0 is greedy; one value or one per scale.
            temperature_last: apply the temperature after top-k/top-p (VAR's order)
                rather than before.
            generator: one ``torch.Generator`` per row (a row's image then does not
                depend on its batch mates), or one shared by all rows; None only
                when greedy.
            more_smooth: VAR's visualisation mode (Gumbel-softmax mixtures of code
                vectors instead of the sampled codes' vectors).
            output_type: ``"pil"`` (images and token maps) or ``"tokens"``.
        """
        call_kwargs = dict(
            class_labels=class_labels,
            cfg=cfg,
            top_k=top_k,
            top_p=top_p,
            temperature=temperature,
            temperature_last=temperature_last,
            generator=generator,
            more_smooth=more_smooth,
            output_type=output_type,
        )
        run = attached_run(self)
        if run is None:
            return self.generate(**call_kwargs)
        return run.guarded_call(call_kwargs, lambda: self.generate(run=run, **call_kwargs))

    def decoder_for(
        self,
        class_labels: Any,
        *,
        cfg: float = 1.5,
        top_k: Any = None,
        top_p: Any = None,
        temperature: Any = 1.0,
        temperature_last: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
        more_smooth: bool = False,
        run: Any = None,
    ) -> ScaleDecoder:
        """The `ScaleDecoder` of a call (nothing run yet); ``run`` counts its forwards in ``run.nfe``."""
        labels = self.class_ids(class_labels).to(self.device)
        K = len(self.patch_nums)
        if not isinstance(cfg, (int, float)) or isinstance(cfg, bool) or not math.isfinite(cfg):
            raise ValueError(f"cfg must be a finite number (0: unguided), got {cfg!r}.")
        samplers = [
            Sampler(temperature=t, top_k=k, top_p=p, temperature_last=temperature_last)
            for t, k, p in zip(
                per_scale(temperature, K, "temperature"),
                per_scale(top_k, K, "top_k"),
                per_scale(top_p, K, "top_p"),
            )
        ]
        greedy = all(s.greedy for s in samplers)
        generators = row_generators(generator, labels.shape[0], self.device)
        if generators is None and not (greedy and not more_smooth):
            raise ValueError(
                "sampling needs one generator per row (generator=[torch.Generator().manual_seed(s) "
                "for s in seeds]); only temperature 0 without more_smooth runs without one."
            )
        decoder = ScaleDecoder(
            self,
            labels,
            cfg=cfg,
            samplers=samplers,
            generators=generators,
            more_smooth=more_smooth,
            run=run,
        )
        self.decoder = decoder
        return decoder

    @torch.no_grad()
    def generate(
        self, class_labels: Any, *, run: Any = None, output_type: str = "pil", **kwargs: Any
    ) -> VAROutput:
        """The loop: plan the models (``decodekit_scale_models``), run every scale, decode."""
        if output_type not in ("pil", "tokens"):
            raise ValueError(f"output_type must be 'pil' or 'tokens', got {output_type!r}.")
        decoder = self.decoder_for(class_labels, run=run, **kwargs)
        plan = ScalePlan([self.transformer] * decoder.num_scales)
        if run is not None and run.has("decodekit_scale_models"):
            run.call("decodekit_scale_models", run=run, plan=plan)
            if len(plan.models) != decoder.num_scales:
                raise ValueError(
                    f"decodekit_scale_models left {len(plan.models)} models in plan.models; "
                    f"it needs one per scale ({decoder.num_scales})."
                )
        for si in range(decoder.num_scales):
            tokens = decoder.run_scale(plan.models[si])
            if run is not None and run.has("decodekit_scale_end"):
                run.call(
                    "decodekit_scale_end", run=run, scale=si, model=plan.models[si], tokens=tokens
                )
        images = self.decode_fhat(decoder.f_hat) if output_type == "pil" else None
        return VAROutput(images, decoder.token_maps, decoder.f_hat, decoder.forwards, decoder.stats)

    @torch.no_grad()
    def decode_fhat(self, f_hat: Tensor) -> list[Any]:
        """PIL images from accumulated features ``(B, Cvae, pn_K, pn_K)``."""
        from diffusers.image_processor import VaeImageProcessor

        pixels = self.vq.fhat_to_img(f_hat)  # (B, 3, H, W) in [-1, 1]
        return VaeImageProcessor(do_resize=False).postprocess(pixels.float(), output_type="pil")


def row_generators(
    generator: Any, batch: int, device: torch.device
) -> list[torch.Generator] | None:
    """One generator per row from one shared generator or a list of ``batch``; None stays None."""
    if generator is None:
        return None
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * batch
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} generators for {batch} rows; pass one per row.")
    for g in gens:
        check_generator(g, torch.empty(0, device=device), "VARPipeline")
    return gens
