"""VAR's multi-scale residual VQ-VAE: `MultiScaleVQConfig`, `MultiScaleVQVAE`.

"Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale
Prediction" (Tian et al., arXiv:2404.02905; FoundationVision/VAR,
``models/vqvae.py``, ``models/quant.py``, ``models/basic_vae.py``). An image is
encoded once (a taming-style convolutional encoder, then ``quant_conv``) into a
feature map ``f`` of ``v_patch_nums[-1]`` squared cells; the quantiser describes
``f`` by K token maps of growing side ``pn_1 < ... < pn_K``, each one quantising
what the previous ones left over:

- scale ``k`` area-downsamples the residual to ``pn_k x pn_k`` and takes the
  nearest codebook entry of every cell (squared distance, or cosine with
  ``using_znorm``);
- the chosen entries are bicubic-upsampled back to the full side (the last
  scale is already full size), passed through a shared convolution ``phi``
  (``phi(h) = (1 - r) h + r conv3x3(h)``, ``r = quant_resi``) and added to
  ``f_hat``, the reconstruction so far, and subtracted from the residual;
- ``share_quant_resi`` convolutions serve the K scales: scale ``k`` uses the one
  whose tick (evenly spread over [0, 1]) is nearest ``k / (K - 1)``; 0 gives
  every scale its own, 1 a single shared one.

The decoder (``post_quant_conv``, then the mirror of the encoder) turns
``f_hat`` into pixels in [-1, 1]. The VAR transformer reads the same
quantiser step by step: `next_scale_input` adds scale ``k``'s tokens to
``f_hat`` and returns the area-downsampled ``f_hat`` that is the input of scale
``k + 1``; `teacher_inputs` does that for all scales at once (teacher forcing).

Parameter names follow the released checkpoint (``encoder.down.{i}.block.{j}``,
``quantize.embedding``, ``quantize.quant_resi.qresi_ls.{i}``, ...), so
``vae_ch160v4096z32.pth`` loads once its training statistic
``quantize.ema_vocab_hit_SV`` is dropped (``decodekit convert-var`` does that).
Only inference is written here (no training losses).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from decodekit.errors import ConfigError, DecodekitError
from decodekit.pipelines.convert_llada import CheckpointError
from torch import nn

__all__ = ["MultiScaleVQConfig", "MultiScaleVQVAE", "VQInputError"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "var-vqvae"


class VQInputError(DecodekitError, ValueError):
    """Images or token maps that do not fit the VQ-VAE (wrong shape, size, range or ids)."""


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive" if minimum == 1 else "a non-negative"
        raise ConfigError(name, f"must be {kind} integer, got {value!r}.")


@dataclass
class MultiScaleVQConfig:
    """The shape of a VAR VQ-VAE (the arguments of VAR's ``VQVAE``).

    Attributes:
        vocab_size: codebook entries (4096 in the release).
        z_channels: channels of the quantised feature map, ``Cvae`` (32).
        ch: base width of the encoder and decoder (160); every ``ch * mult`` must be a
            multiple of 32 (GroupNorm with 32 groups).
        ch_mult: width multipliers per resolution (``(1, 1, 2, 2, 4)``: 4 halvings,
            downsampling 16).
        num_res_blocks: residual blocks per encoder resolution (the decoder has one more).
        dropout: dropout of the residual blocks (inactive at inference).
        beta: commitment-loss weight of training; kept for completeness.
        using_znorm: choose codes by cosine similarity instead of squared distance.
        quant_conv_ks: kernel size of ``quant_conv`` and ``post_quant_conv`` (3).
        quant_resi: ``r`` of ``phi(h) = (1 - r) h + r conv(h)``; ``|r| < 1e-6``: no ``phi``.
        share_quant_resi: number of ``phi`` convolutions shared over the scales
            (4; 0: one per scale, 1: a single one).
        default_qresi_counts: with ``share_quant_resi = 0``, the number of ``phi``
            (0: one per scale).
        v_patch_nums: side of each scale's token map, increasing; the last is the side of
            the feature map (image side / downsample).
        test_mode: build in eval mode with gradients off, as VAR does for inference.
    """

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    dropout: float = 0.0
    beta: float = 0.25
    using_znorm: bool = False
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    default_qresi_counts: int = 0
    v_patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    test_mode: bool = True

    def __post_init__(self) -> None:
        for name in ("ch_mult", "v_patch_nums"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ConfigError(name, f"must be a list of integers, got {value!r}.")
            setattr(self, name, tuple(value))
        for name in ("vocab_size", "z_channels", "ch", "num_res_blocks", "quant_conv_ks"):
            _check_int(name, getattr(self, name), 1)
        for name in ("share_quant_resi", "default_qresi_counts"):
            _check_int(name, getattr(self, name), 0)
        for i, m in enumerate(self.ch_mult):
            _check_int(f"ch_mult.{i}", m, 1)
        for i, p in enumerate(self.v_patch_nums):
            _check_int(f"v_patch_nums.{i}", p, 1)
        for name in ("quant_resi", "dropout", "beta"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ConfigError(name, f"must be a number, got {value!r}.")
        for name in ("using_znorm", "test_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}.")
        if self.quant_conv_ks % 2 == 0:
            raise ConfigError(
                "quant_conv_ks", f"must be odd (same padding), got {self.quant_conv_ks}."
            )
        if not self.ch_mult:
            raise ConfigError("ch_mult", "needs at least one resolution, e.g. (1, 1, 2, 2, 4).")
        widths = [self.ch * m for m in self.ch_mult]
        if any(w % 32 for w in widths):
            raise ConfigError(
                "ch",
                f"the widths {widths} (ch x ch_mult) must be multiples of 32 (GroupNorm 32 groups).",
            )
        pns = self.v_patch_nums
        if len(pns) < 2 or any(a >= b for a, b in zip(pns, pns[1:])):
            raise ConfigError(
                "v_patch_nums",
                f"must be at least two increasing positive sides, e.g. (1, 2, 3, 4); got {pns!r}.",
            )
        if abs(self.quant_resi) > 1:
            raise ConfigError("quant_resi", f"must lie in [-1, 1], got {self.quant_resi!r}.")

    @property
    def downsample(self) -> int:
        """Pixels per feature-map cell along each side."""
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` content (tuples as lists, with ``model_type``)."""
        out: dict[str, Any] = {"model_type": MODEL_TYPE}
        for key, value in asdict(self).items():
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MultiScaleVQConfig:
        """The config of a ``config.json`` dict; unknown keys are an error."""
        data = dict(data)
        kind = data.pop("model_type", MODEL_TYPE)
        if kind != MODEL_TYPE:
            raise ConfigError(
                "model_type", f"expected {MODEL_TYPE!r} (a VAR VQ-VAE folder), got {kind!r}."
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                unknown[0], f"unknown VQ-VAE config key(s) {unknown}; known: {sorted(known)}."
            )
        return cls(**data)


# --------------------------------------------------------------------------- building blocks
def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, c_in: int, c_out: int, dropout: float):
        super().__init__()
        self.norm1 = _group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _group_norm(c_out)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the cells of a feature map, added to the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C), scale 1/sqrt(C)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Halve the side: pad right and bottom by one, then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the side: nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Resolution(nn.Module):
    """One resolution of the encoder or decoder: residual blocks, attention after each at the
    lowest resolution, then the resampler (none at the encoder's last / decoder's first)."""

    def __init__(self, widths: list[tuple[int, int]], attend: bool, dropout: float):
        super().__init__()
        self.block = nn.ModuleList(ResidualBlock(a, b, dropout) for a, b in widths)
        self.attn = nn.ModuleList(SpatialSelfAttention(b) for _, b in widths if attend)

    def blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class Middle(nn.Module):
    """Residual block, self-attention, residual block at the lowest resolution."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResidualBlock(channels, channels, dropout)
        self.attn_1 = SpatialSelfAttention(channels)
        self.block_2 = ResidualBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class ImageEncoder(nn.Module):
    """Pixels (B, 3, H, W) -> features (B, z_channels, H / d, W / d)."""

    def __init__(self, cfg: MultiScaleVQConfig):
        super().__init__()
        mults = (1, *cfg.ch_mult)
        last = len(cfg.ch_mult) - 1
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.ch_mult):
            c_in, c_out = cfg.ch * mults[level], cfg.ch * mult
            widths = [(c_in if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks)]
            res = Resolution(widths, attend=level == last, dropout=cfg.dropout)
            if level != last:
                res.downsample = Downsample(c_out)
            self.down.append(res)
        top = cfg.ch * cfg.ch_mult[-1]
        self.mid = Middle(top, cfg.dropout)
        self.norm_out = _group_norm(top)
        self.conv_out = nn.Conv2d(top, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for res in self.down:
            h = res.blocks(h)
            if hasattr(res, "downsample"):
                h = res.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class ImageDecoder(nn.Module):
    """Features (B, z_channels, h, w) -> pixels (B, 3, h * d, w * d), unclamped."""

    def __init__(self, cfg: MultiScaleVQConfig):
        super().__init__()
        last = len(cfg.ch_mult) - 1
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = Middle(c, cfg.dropout)
        levels: list[Resolution] = []
        for level in reversed(range(len(cfg.ch_mult))):  # built from the lowest resolution up
            c_out = cfg.ch * cfg.ch_mult[level]
            widths = [(c if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks + 1)]
            res = Resolution(widths, attend=level == last, dropout=cfg.dropout)
            if level != 0:
                res.upsample = Upsample(c_out)
            levels.insert(0, res)  # up[i] is resolution i, as in the checkpoint
            c = c_out
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for res in reversed(self.up):
            h = res.blocks(h)
            if hasattr(res, "upsample"):
                h = res.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------- quantiser
class Phi(nn.Conv2d):
    """``phi(h) = (1 - r) h + r conv3x3(h)``: the refinement of an upsampled token map."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


def phi_ticks(count: int) -> list[float]:
    """Where each of ``count`` shared ``phi`` sits on [0, 1] (VAR: evenly spread, with
    margins 1/(3K) for K = 4 and 1/(2K) otherwise); computed as ``numpy.linspace`` does."""
    margin = 1 / 3 / count if count == 4 else 1 / 2 / count
    start, stop = margin, 1 - margin
    if count == 1:
        return [start]
    step = (stop - start) / (count - 1)
    return [i * step + start for i in range(count - 1)] + [stop]


def phi_index(si: int, num_scales: int, count: int) -> int:
    """The ``phi`` that scale ``si`` of ``num_scales`` uses: nearest tick to ``si / (K - 1)``
    (the first of equally near ones)."""
    at = si / (num_scales - 1)
    ticks = phi_ticks(count)
    return min(range(count), key=lambda i: abs(ticks[i] - at))


class PhiBank(nn.Module):
    """The ``phi`` convolutions of the quantiser, under the checkpoint's names.

    ``share_quant_resi`` = 1: ``qresi`` (one for every scale); 0: ``0 .. n-1`` (one per
    scale, or ``default_qresi_counts``); n > 1: ``qresi_ls.0 .. n-1``. With
    ``|quant_resi| < 1e-6`` the convolutions are identities without weights.
    """

    def __init__(self, cfg: MultiScaleVQConfig):
        super().__init__()

        def make() -> nn.Module:
            return (
                Phi(cfg.z_channels, cfg.quant_resi) if abs(cfg.quant_resi) > 1e-6 else nn.Identity()
            )

        share = cfg.share_quant_resi
        if share == 1:
            self.qresi = make()
            self._phis = [self.qresi]
        elif share == 0:
            count = cfg.default_qresi_counts or len(cfg.v_patch_nums)
            for i in range(count):
                self.add_module(str(i), make())
            self._phis = [getattr(self, str(i)) for i in range(count)]
        else:
            self.qresi_ls = nn.ModuleList(make() for _ in range(share))
            self._phis = list(self.qresi_ls)

    def for_scale(self, si: int, num_scales: int) -> nn.Module:
        """The ``phi`` of scale ``si``."""
        return self._phis[phi_index(si, num_scales, len(self._phis))]


class MultiScaleQuantizer(nn.Module):
    """The codebook (``embedding``) and the ``phi`` bank (``quant_resi``) of the quantiser."""

    def __init__(self, cfg: MultiScaleVQConfig):
        super().__init__()
        self.using_znorm = cfg.using_znorm
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)
        self.quant_resi = PhiBank(cfg)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Code ids (N,) of feature vectors (N, C)."""
        codes = self.embedding.weight  # (V, C)
        if self.using_znorm:
            return torch.argmax(F.normalize(z, dim=-1) @ F.normalize(codes, dim=-1).T, dim=1)
        # |z|^2 + |e|^2 - 2 z.e, (N, V)
        sq = z.square().sum(1, keepdim=True) + codes.square().sum(1)
        return torch.argmin(torch.addmm(sq, z, codes.T, alpha=-2), dim=1)


# --------------------------------------------------------------------------- the VQ-VAE
def _describe(x: Any) -> str:
    return f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def _require_maps(
    x: Any, chw: tuple[int, int, int], what: str, hint: str = "", batch: int | None = None
) -> None:
    """Raise `VQInputError` unless ``x`` is a float tensor (B, *chw) (with B = ``batch`` if given)."""
    if (
        isinstance(x, torch.Tensor)
        and x.is_floating_point()
        and x.dim() == 4
        and tuple(x.shape[1:]) == chw
        and (batch is None or x.shape[0] == batch)
    ):
        return
    dims = ", ".join(map(str, ("B" if batch is None else batch, *chw)))
    raise VQInputError(f"{what} should be a float tensor ({dims}){hint}; got {_describe(x)}.")


class MultiScaleVQVAE(nn.Module):
    """VAR's VQ-VAE: images <-> K token maps of sides ``v_patch_nums``, through ``f_hat``."""

    def __init__(self, config: MultiScaleVQConfig | None = None):
        super().__init__()
        self.config = config = config or MultiScaleVQConfig()
        self.encoder = ImageEncoder(config)
        self.decoder = ImageDecoder(config)
        self.quantize = MultiScaleQuantizer(config)
        ks = config.quant_conv_ks
        self.quant_conv = nn.Conv2d(config.z_channels, config.z_channels, ks, padding=ks // 2)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, ks, padding=ks // 2)
        if config.test_mode:
            self.eval()
            self.requires_grad_(False)

    # ---------------------------------------------------------------- shape
    @property
    def patch_nums(self) -> tuple[int, ...]:
        """Side of each scale's token map."""
        return self.config.v_patch_nums

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def embed_dim(self) -> int:
        """Channels of the feature map and the codebook (VAR's ``Cvae``)."""
        return self.config.z_channels

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def image_size(self) -> int:
        """Side of the images this VQ-VAE encodes and decodes."""
        return self.patch_nums[-1] * self.downsample

    # ---------------------------------------------------------------- saving and loading
    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` to ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        (folder / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=1) + "\n")

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, dtype: torch.dtype | None = None
    ) -> MultiScaleVQVAE:
        """Load a folder written by `save_pretrained` or ``decodekit convert-var``."""
        from safetensors.torch import load_file

        folder = Path(folder).expanduser()
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise CheckpointError(
                f"{folder} is not a VAR VQ-VAE folder (it needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
                "convert VAR's vae_ch160v4096z32.pth with `decodekit convert-var --vae PTH --out DIR`."
            )
        try:
            data = json.loads((folder / CONFIG_NAME).read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{folder / CONFIG_NAME} is not valid JSON: {e}.") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{folder / CONFIG_NAME} holds no JSON object.")
        model = cls(MultiScaleVQConfig.from_dict(data))
        try:
            state = load_file(folder / WEIGHTS_NAME)
        except Exception as e:  # noqa: BLE001 - a damaged file is reported the same way
            raise CheckpointError(
                f"{folder / WEIGHTS_NAME} is not a readable safetensors file ({type(e).__name__}: "
                f"{e}); write it again with save_pretrained or convert-var."
            ) from None
        model.load_weights(state, source=str(folder / WEIGHTS_NAME))
        if dtype is not None:
            model.to(dtype)
        return model

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "the state dict") -> None:
        """Load ``state`` strictly; mismatched keys or shapes are named in the error."""
        own = self.state_dict()
        problems = [f"missing {k}" for k in own if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in own]
        problems += [
            f"{k} has shape {tuple(v.shape)} where the config wants {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and v.shape != own[k].shape
        ]
        if problems:
            more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
            raise CheckpointError(
                f"{source} does not fit this VQ-VAE config: {'; '.join(problems[:4])}{more}. "
                "Are the config and the weights from the same model?"
            )
        dtype = next(self.parameters()).dtype
        self.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)

    # ---------------------------------------------------------------- checks
    def _check_idx(self, idx: Any) -> list[torch.Tensor]:
        pns = self.patch_nums
        if not isinstance(idx, (list, tuple)) or len(idx) != len(pns):
            got = len(idx) if isinstance(idx, (list, tuple)) else type(idx).__name__
            raise VQInputError(
                f"expected a list of {len(pns)} token maps (one per scale, sides {pns}), got {got}."
            )
        batch = None
        out = []
        for si, (t, pn) in enumerate(zip(idx, pns)):
            if (
                not isinstance(t, torch.Tensor)
                or t.dtype.is_floating_point
                or t.dtype.is_complex
                or t.dim() != 2
                or t.shape[1] != pn * pn
                or (batch is not None and t.shape[0] != batch)
            ):
                raise VQInputError(
                    f"token map {si} should be integer ids of shape (B, {pn * pn}) (side {pn}) "
                    f"with one B for all scales; got {_describe(t)}."
                )
            batch = t.shape[0]
            self._check_device(t, f"token map {si}")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.vocab_size):
                raise VQInputError(
                    f"token map {si} holds ids outside [0, {self.vocab_size}) (the codebook)."
                )
            out.append(t.long())
        return out

    def _check_fhat(self, f_hat: Any, what: str = "f_hat") -> None:
        side = self.patch_nums[-1]
        _require_maps(f_hat, (self.embed_dim, side, side), what)
        self._check_device(f_hat, what)

    def _check_device(self, x: torch.Tensor, what: str) -> None:
        device = self.quantize.embedding.weight.device
        if x.device != device:
            raise VQInputError(
                f"{what} is on {x.device}, the VQ-VAE on {device}; move one with .to(device)."
            )

    # ---------------------------------------------------------------- the quantiser
    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Codebook lookup: ids (B, L) -> vectors (B, L, Cvae)."""
        return self.quantize.embedding(idx)

    def _phi(self, si: int) -> nn.Module:
        return self.quantize.quant_resi.for_scale(si, len(self.patch_nums))

    def _scale_contribution(self, si: int, h: torch.Tensor) -> torch.Tensor:
        """What scale ``si``'s token map ``h`` (B, C, pn, pn) adds to ``f_hat`` (full side)."""
        side = self.patch_nums[-1]
        if si != len(self.patch_nums) - 1:
            h = F.interpolate(h, size=(side, side), mode="bicubic")
        return self._phi(si)(h)

    def _area(self, f: torch.Tensor, side: int) -> torch.Tensor:
        return F.interpolate(f, size=(side, side), mode="area")

    def next_scale_input(
        self, si: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add scale ``si``'s embedded token map to ``f_hat``; return ``(f_hat, next input)``.

        ``h_BChw`` (B, Cvae, pn_si, pn_si) is the codebook lookup of scale ``si``'s tokens;
        ``f_hat`` (B, Cvae, pn_K, pn_K) the sum of the earlier scales (zeros before scale 0),
        and is not modified: a new tensor is returned. The next input is the new ``f_hat``
        area-downsampled to ``pn_{si+1}`` (B, Cvae, pn_{si+1}, pn_{si+1}); after the last scale
        it is ``f_hat`` itself. (VAR's ``get_next_autoregressive_input``.)
        """
        k = len(self.patch_nums)
        if isinstance(si, bool) or not isinstance(si, int) or not 0 <= si < k:
            raise VQInputError(f"scale index si must be an int in [0, {k}), got {si!r}.")
        self._check_fhat(f_hat)
        pn = self.patch_nums[si]
        what = f"h_BChw of scale {si}"
        _require_maps(h_BChw, (self.embed_dim, pn, pn), what, batch=f_hat.shape[0])
        self._check_device(h_BChw, what)
        f_hat = f_hat + self._scale_contribution(si, h_BChw)
        if si == k - 1:
            return f_hat, f_hat
        return f_hat, self._area(f_hat, self.patch_nums[si + 1])

    def _token_map(self, idx: torch.Tensor, pn: int) -> torch.Tensor:
        """(B, pn*pn) ids -> (B, Cvae, pn, pn) codebook vectors."""
        return self.embed(idx).transpose(1, 2).reshape(idx.shape[0], self.embed_dim, pn, pn)

    def _zeros_fhat(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        side = self.patch_nums[-1]
        weight = self.quantize.embedding.weight
        return torch.zeros(
            batch, self.embed_dim, side, side, dtype=weight.dtype, device=like.device
        )

    def idx_to_fhat(self, idx: list[torch.Tensor]) -> torch.Tensor:
        """The final ``f_hat`` (B, Cvae, pn_K, pn_K) of K token maps (B, pn_k^2)."""
        idx = self._check_idx(idx)
        f_hat = self._zeros_fhat(idx[0].shape[0], idx[0])
        for si, (t, pn) in enumerate(zip(idx, self.patch_nums)):
            f_hat = f_hat + self._scale_contribution(si, self._token_map(t, pn))
        return f_hat

    def teacher_inputs(self, idx: list[torch.Tensor]) -> torch.Tensor:
        """The transformer's inputs of scales 1..K-1 for known token maps: (B, L - pn_1^2, Cvae).

        Scale ``k``'s rows are ``f_hat`` after scales ``0 .. k-1``, area-downsampled to
        ``pn_k`` and flattened row-major (VAR's ``idxBl_to_var_input``).
        """
        idx = self._check_idx(idx)
        f_hat = self._zeros_fhat(idx[0].shape[0], idx[0])
        rows = []
        for si in range(len(self.patch_nums) - 1):
            h = self._token_map(idx[si], self.patch_nums[si])
            f_hat, nxt = self.next_scale_input(si, f_hat, h)
            rows.append(nxt.flatten(2).transpose(1, 2))  # (B, pn_{si+1}^2, C)
        return torch.cat(rows, dim=1)

    # ---------------------------------------------------------------- images
    def img_to_idx(self, img: torch.Tensor) -> list[torch.Tensor]:
        """K token maps (B, pn_k^2) of images (B, 3, H, W) in [-1, 1] (VAR's ``img_to_idxBl``)."""
        side = self.image_size
        hint = (
            f" in [-1, 1] (v_patch_nums[-1] {self.patch_nums[-1]} x downsample {self.downsample})"
        )
        _require_maps(img, (3, side, side), "images", hint)
        self._check_device(img, "images")
        return self.features_to_idx(
            self.quant_conv(self.encoder(img.to(self.quant_conv.weight.dtype)))
        )

    def features_to_idx(self, f: torch.Tensor) -> list[torch.Tensor]:
        """K token maps (B, pn_k^2) of an encoded feature map ``f`` (B, Cvae, pn_K, pn_K)."""
        self._check_fhat(f, "the feature map")
        b, c = f.shape[:2]
        rest = f
        last = len(self.patch_nums) - 1
        out = []
        for si, pn in enumerate(self.patch_nums):
            z = rest if si == last else self._area(rest, pn)
            ids = self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, c)).view(b, pn * pn)
            rest = rest - self._scale_contribution(si, self._token_map(ids, pn))
            out.append(ids)
        return out

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] of a feature map ``f_hat`` (B, Cvae, pn_K, pn_K)."""
        self._check_fhat(f_hat)
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def idx_to_img(self, idx: list[torch.Tensor]) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] of K token maps."""
        return self.fhat_to_img(self.idx_to_fhat(idx))
