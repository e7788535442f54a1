"""The MAR model: a masked bidirectional transformer over continuous tokens with a diffusion head.

"Autoregressive Image Generation without Vector Quantization" (Li et al.,
arXiv:2406.11838; LTH14/mar). An image is a grid of continuous tokens: the
latents of a KL autoencoder, ``(img_size / vae_stride)**2`` positions, cut into
``patch_size x patch_size`` patches of ``token_embed_dim = vae_embed_dim *
patch_size**2`` numbers each.

* **Encoder** (MAE-style): every token goes through ``z_proj``; ``buffer_size``
  buffer tokens in front carry the class embedding (or ``fake_latent``, the
  learned null class of classifier-free guidance); learned positions,
  ``z_proj_ln``, then only the *known* (unmasked) positions and the buffer enter
  the ViT blocks.
* **Decoder**: the encoder's output is projected, the masked positions are
  filled with ``mask_token``, learned positions are added, ViT blocks run over
  all positions, the buffer is dropped and ``diffusion_pos_embed_learned`` added:
  ``z`` ``(B, N, decoder_embed_dim)``, one condition vector per position.
* **Diffusion head** (`DiffusionHead`): a small MLP with adaptive layer norm,
  conditioned on ``z`` and the timestep, predicts the noise and a variance
  interpolation (``learn_sigma``); training is DDPM's MSE plus the variational
  bound on 1000 steps of a cosine schedule, sampling is ancestral DDPM respaced to
  ``num_sampling_steps``, as MAR's ``diffusion/`` package (from DiT / improved
  DDPM) does, with its temperature scaling the noise of every step.

Module and parameter names follow MAR's ``models/mar.py`` and
``models/diffloss.py`` (and timm's ViT ``Block``), so a released checkpoint's
state dict loads as it is (``decodekit convert-mar``). The code is written
here, not copied. The sampling loop lives in ``decodekit.pipelines.mar_pipeline``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CONFIG_FILE",
    "PRESETS",
    "WEIGHTS_FILE",
    "DiffusionHead",
    "DiffusionSchedule",
    "HeadTrajectory",
    "MARConfig",
    "MARModel",
    "named_betas",
    "spaced_timesteps",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

TRAIN_TIMESTEPS = 1000
"""Length of the diffusion process the head is trained on (MAR's ``diffusion_steps``)."""


# ---------------------------------------------------------------------------------------- config
@dataclass
class MARConfig:
    """Everything that fixes a MAR model's shapes; the defaults are ``mar_large`` at 256 px.

    Attributes:
        img_size: image side in pixels.
        vae_stride: pixels per latent position of the KL autoencoder (16 for KL-16).
        patch_size: latent positions per token side; a token holds
            ``vae_embed_dim * patch_size**2`` numbers.
        vae_embed_dim: latent channels of the autoencoder.
        encoder_embed_dim, encoder_depth, encoder_num_heads: the MAE encoder.
        decoder_embed_dim, decoder_depth, decoder_num_heads: the MAE decoder.
        mlp_ratio: hidden width of every ViT MLP, as a multiple of its width.
        norm_eps: epsilon of the ViT layer norms (``mar_base/large/huge`` use 1e-6).
        class_num: number of classes (the null class is ``fake_latent``, not an id).
        buffer_size: buffer tokens in front of the sequence, filled with the class embedding.
        label_drop_prob: training: probability of replacing a label with the null class.
        mask_ratio_min: training: the masking ratio is drawn from a normal at 1.0
            (std 0.25) truncated to ``[mask_ratio_min, 1]``.
        attn_dropout, proj_dropout: training dropout of the ViT blocks.
        diffloss_d: residual blocks of the diffusion head.
        diffloss_w: width of the diffusion head.
        num_sampling_steps: DDPM steps at sampling, MAR's ``timestep_respacing``
            string (``"100"``; comma-separated section counts allowed).
        diffusion_batch_mul: training: each token's loss is drawn this many times.
        noise_schedule: the head's beta schedule, ``"cosine"`` as MAR trains it, or ``"linear"``.
        grad_checkpointing: recompute blocks in the backward pass to save memory.
    """

    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    vae_embed_dim: int = 16
    encoder_embed_dim: int = 1024
    encoder_depth: int = 16
    encoder_num_heads: int = 16
    decoder_embed_dim: int = 1024
    decoder_depth: int = 16
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    class_num: int = 1000
    buffer_size: int = 64
    label_drop_prob: float = 0.1
    mask_ratio_min: float = 0.7
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    diffloss_d: int = 3
    diffloss_w: int = 1024
    num_sampling_steps: str = "100"
    diffusion_batch_mul: int = 4
    noise_schedule: str = "cosine"
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.num_sampling_steps = str(self.num_sampling_steps)
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                problems.append(f"{f.name} must be an int, got {value!r}")
        if not problems:
            for name in ("img_size", "vae_stride", "patch_size", "vae_embed_dim", "class_num"):
                if getattr(self, name) < 1:
                    problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
            if self.img_size % (self.vae_stride * self.patch_size):
                problems.append(
                    f"img_size ({self.img_size}) must be a multiple of vae_stride * patch_size "
                    f"({self.vae_stride} * {self.patch_size})"
                )
            for part in ("encoder", "decoder"):
                dim, heads = getattr(self, f"{part}_embed_dim"), getattr(self, f"{part}_num_heads")
                if dim < 1 or heads < 1 or dim % heads:
                    problems.append(
                        f"{part}_embed_dim ({dim}) must be a positive multiple of "
                        f"{part}_num_heads ({heads})"
                    )
            if self.noise_schedule not in ("cosine", "linear"):
                problems.append(
                    f"noise_schedule must be 'cosine' or 'linear', got {self.noise_schedule!r}"
                )
            try:
                spaced_timesteps(TRAIN_TIMESTEPS, self.num_sampling_steps)
            except ValueError as e:
                problems.append(str(e))
        if problems:
            raise ValueError("MARConfig: " + "; ".join(problems) + ".")

    @property
    def seq_h(self) -> int:
        """Token rows (and columns) of the grid."""
        return self.img_size // self.vae_stride // self.patch_size

    @property
    def seq_len(self) -> int:
        """N, the number of tokens of an image."""
        return self.seq_h * self.seq_h

    @property
    def token_embed_dim(self) -> int:
        """D, the numbers per token: ``vae_embed_dim * patch_size**2``."""
        return self.vae_embed_dim * self.patch_size**2

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MARConfig:
        """A config from a ``config.json`` dict; an unknown key is an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MARConfig: unknown keys {unknown}; known: {sorted(known)}.")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    "mar_base": dict(
        encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
        decoder_embed_dim=768, decoder_depth=12, decoder_num_heads=12, diffloss_d=6,
    ),
    "mar_large": dict(
        encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16,
        decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16, diffloss_d=8,
        diffloss_w=1280,
    ),
    "mar_huge": dict(
        encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16,
        decoder_embed_dim=1280, decoder_depth=20, decoder_num_heads=16, diffloss_d=12,
        diffloss_w=1536,
    ),
}  # fmt: skip
"""The released models' transformer and head sizes (MAR's README: heads 6x1024, 8x1280, 12x1536)."""


# ---------------------------------------------------------------------------------------- ViT blocks
class Attention(nn.Module):
    """Multi-head self-attention with one ``qkv`` projection (timm's ``Attention`` layout)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, c)
        drop = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)  # (B, H, L, c)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, L, C)))


class Mlp(nn.Module):
    """Linear, GELU, linear, with dropout after each (timm's ``Mlp`` layout)."""

    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, config: MARConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = Attention(dim, num_heads, config.attn_dropout, config.proj_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), config.proj_dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------------------- diffusion
def named_betas(name: str, num_timesteps: int) -> Tensor:
    """The float64 betas of improved DDPM's ``"linear"`` or ``"cosine"`` schedule."""
    if name == "linear":
        scale = 1000 / num_timesteps
        return torch.linspace(
            scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64, device="cpu"
        )
    if name == "cosine":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [
            min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
            for i in range(num_timesteps)
        ]
        return torch.tensor(betas, dtype=torch.float64, device="cpu")
    raise ValueError(f"unknown noise schedule {name!r}; known: 'linear', 'cosine'.")


def spaced_timesteps(num_timesteps: int, section_counts: str | int) -> list[int]:
    """The timesteps kept by respacing ``num_timesteps`` to ``section_counts`` (sorted).

    ``"100"`` keeps 100 evenly strided steps; ``"10,15,20"`` strides each third
    of the process separately (improved DDPM's ``space_timesteps``).
    """
    text = str(section_counts)
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        raise ValueError(
            f"num_sampling_steps must be a step count like '100' (or counts per section "
            f"'10,20'), got {text!r}"
        ) from None
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(
                f"num_sampling_steps: cannot take {count} steps from a section of {size}"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    if len(set(kept)) < 2:
        raise ValueError(f"num_sampling_steps must keep at least 2 steps, got {text!r}")
    return sorted(set(kept))


class DiffusionSchedule:
    """The DDPM quantities of a (respaced) process, float64 on the CPU, indexed by step ``i``.

    Step ``i`` runs from ``x_i`` to ``x_{i-1}``; ``timesteps[i]`` is the original
    timestep the network sees. Respacing keeps the kept steps' ``alphas_cumprod``.
    """

    def __init__(self, base_betas: Tensor, kept: list[int]):
        base_cumprod = torch.cumprod(1 - base_betas, 0)
        self.timesteps = torch.tensor(kept, dtype=torch.long, device="cpu")
        cumprod = base_cumprod[self.timesteps]  # (S,)
        prev = torch.cat((torch.ones(1, dtype=torch.float64, device="cpu"), cumprod[:-1]))
        self.betas = 1 - cumprod / prev
        self.alphas_cumprod, self.alphas_cumprod_prev = cumprod, prev
        self.sqrt_alphas_cumprod = cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1 / cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / cumprod - 1).sqrt()
        variance = self.betas * (1 - prev) / (1 - cumprod)
        self.posterior_variance = variance
        # the first posterior variance is 0: its log is clipped to the second's
        self.posterior_log_variance_clipped = torch.cat((variance[1:2], variance[1:])).log()
        self.log_betas = self.betas.log()
        self.posterior_mean_coef1 = self.betas * prev.sqrt() / (1 - cumprod)
        self.posterior_mean_coef2 = (1 - prev) * (1 - self.betas).sqrt() / (1 - cumprod)
        # the same as Python numbers, for a step shared by every row (the sampler's)
        self.numbers = {k: v.tolist() for k, v in vars(self).items() if isinstance(v, Tensor)}

    def __len__(self) -> int:
        return len(self.timesteps)

    def at(self, name: str, i: Tensor | int, like: Tensor) -> Tensor | float:
        """Quantity ``name`` at step ``i``: a column ``(n, 1)`` in ``like``'s dtype and device
        for per-row steps ``i`` ``(n,)`` (as MAR casts them), a number for one step ``i``."""
        if isinstance(i, int):
            return self.numbers[name][i]
        return getattr(self, name)[i.cpu()].to(device=like.device, dtype=like.dtype)[:, None]


@dataclass
class HeadTrajectory:
    """One run of the head's sampler: every state and every step's Gaussian.

    Attributes:
        states: ``(S + 1, n, D)``: ``x_T`` (the initial noise) first, the sample ``x_0`` last.
        means: ``(S, n, D)``: the mean of each step's Gaussian ``p(x_{i-1} | x_i)``.
        log_variances: ``(S, n, D)``: its log variance, before the temperature;
            the last step adds no noise (its state is its mean).
        temperature: the factor on every step's standard deviation.
    """

    states: Tensor
    means: Tensor
    log_variances: Tensor
    temperature: float

    @property
    def sample(self) -> Tensor:
        """``x_0``, ``(n, D)``."""
        return self.states[-1]


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features (256, cos then sin) through a two-layer SiLU MLP."""

    def __init__(self, width: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None].to(t.device)  # (n, half)
        emb = torch.cat((args.cos(), args.sin()), dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """``x + gate * mlp(modulate(ln(x), shift, scale))``, shift/scale/gate from the condition."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    """Adaptive layer norm (no affine) and the output projection (DiT's final layer)."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class DenoiserMLP(nn.Module):
    """The head's network: ``(x_t, t, z) -> (eps, v)``, ``(n, 2D)`` (MAR's ``SimpleMLPAdaLN``)."""

    def __init__(self, token_dim: int, z_dim: int, width: int, depth: int):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * token_dim)

    def forward(self, x: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """``x`` ``(n, D)``, timesteps ``t`` ``(n,)``, ``z`` ``(n, Cz)``."""
        y = self.time_embed(t) + self.cond_embed(z)  # (n, W)
        x = self.input_proj(x)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


class DiffusionHead(nn.Module):
    """Per-token DDPM over ``D`` numbers conditioned on ``z``: MAR's ``DiffLoss``.

    The network predicts the noise ``eps`` and ``v`` in [-1, 1], which places the
    step's log variance between the clipped posterior variance's (``v = -1``) and
    ``beta``'s (``v = 1``). `loss` is the training objective; `sample` runs the
    respaced ancestral sampler from given noise, so a caller that holds the noise
    (one generator per row) owns the randomness.
    """

    def __init__(self, config: MARConfig):
        super().__init__()
        self.token_dim = config.token_embed_dim
        self.net = DenoiserMLP(
            self.token_dim, config.decoder_embed_dim, config.diffloss_w, config.diffloss_d
        )
        betas = named_betas(config.noise_schedule, TRAIN_TIMESTEPS)
        self.train_schedule = DiffusionSchedule(betas, list(range(TRAIN_TIMESTEPS)))
        kept = spaced_timesteps(TRAIN_TIMESTEPS, config.num_sampling_steps)
        self.sample_schedule = DiffusionSchedule(betas, kept)

    @property
    def num_steps(self) -> int:
        """S, the sampler's steps."""
        return len(self.sample_schedule)

    # -- the Gaussian of one step ---------------------------------------------------------------
    def _mean_log_variance(
        self, schedule: DiffusionSchedule, x: Tensor, i: Tensor | int, eps: Tensor, v: Tensor
    ) -> tuple[Tensor, Tensor]:
        at = schedule.at
        frac = (v + 1) / 2
        log_var = frac * at("log_betas", i, x) + (1 - frac) * at(
            "posterior_log_variance_clipped", i, x
        )
        x0 = (
            at("sqrt_recip_alphas_cumprod", i, x) * x
            - at("sqrt_recipm1_alphas_cumprod", i, x) * eps
        )
        mean = at("posterior_mean_coef1", i, x) * x0 + at("posterior_mean_coef2", i, x) * x
        return mean, log_var

    def step_distribution(
        self,
        x: Tensor,
        i: int | Tensor,
        z: Tensor,
        cfg: float = 1.0,
        z_uncond: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Mean and log variance ``(n, D)`` of the sampler's step ``i`` (``x_i -> x_{i-1}``).

        ``i`` counts down from ``S - 1`` to 0: one step for every row, or a long
        tensor ``(n,)`` of each row's step (the steps of a whole trajectory in one
        call, as a density evaluation needs them). With ``z_uncond`` the noise is
        guided, ``eps_u + cfg * (eps_c - eps_u)``, and the variance is the
        conditional row's, as MAR's ``forward_with_cfg`` does.
        """
        schedule = self.sample_schedule
        # the original timestep, per row as MAR passes it (one shared row rounds differently)
        if isinstance(i, Tensor):
            if i.shape != (x.shape[0],):
                raise ValueError(f"per-row steps must be ({x.shape[0]},), got {tuple(i.shape)}.")
            t = schedule.timesteps[i.cpu()].to(x.device)
        else:
            i = int(i)
            t = torch.full((x.shape[0],), schedule.numbers["timesteps"][i], device=x.device)
        if z_uncond is None:
            eps, v = self.net(x, t, z).chunk(2, dim=-1)
        else:
            out = self.net(torch.cat((x, x)), torch.cat((t, t)), torch.cat((z, z_uncond)))
            (eps_c, v), (eps_u, _) = (o.chunk(2, dim=-1) for o in out.chunk(2))
            eps = eps_u + cfg * (eps_c - eps_u)
        return self._mean_log_variance(schedule, x, i, eps, v)

    # -- sampling -------------------------------------------------------------------------------
    def draw_noise(
        self,
        n: int,
        generator: torch.Generator | list[torch.Generator] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Noise ``(n, S, D)`` for `sample`: ``[:, 0]`` is ``x_T``, ``[:, k]`` the noise step ``S - k`` adds.

        Step 0, the last, adds none, so ``S`` draws serve ``S`` steps.

        ``generator`` is one generator for all, or a list of ``n``, one per token
        (decodekit never draws from torch's global RNG).
        """
        from decodekit.sampler import check_generator

        shape = (self.num_steps, self.token_dim)
        like = torch.empty(0, device=device)
        for g in generator if isinstance(generator, (list, tuple)) else [generator]:
            check_generator(g, like, "DiffusionHead.draw_noise")
        if isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise ValueError(f"{len(generator)} generators for {n} tokens; pass one per token.")
            rows = [torch.randn(shape, generator=g, device=device, dtype=dtype) for g in generator]
            return torch.stack(rows) if rows else torch.empty(0, *shape, device=device, dtype=dtype)
        return torch.randn((n, *shape), generator=generator, device=device, dtype=dtype)

    def sample(
        self,
        z: Tensor,
        temperature: float = 1.0,
        cfg: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        *,
        z_uncond: Tensor | None = None,
        noise: Tensor | None = None,
        trajectory: bool = False,
    ) -> Tensor | HeadTrajectory:
        """Sample one token ``(n, D)`` per condition ``z`` ``(n, Cz)``.

        Args:
            z: the conditions (the decoder's output at the tokens' positions).
            temperature: factor on every step's standard deviation (MAR's ``temperature``).
            cfg: guidance scale; used when ``z_uncond`` (the null class's conditions) is given.
            generator: draws the noise when ``noise`` is None (see `draw_noise`).
            noise: ``(n, S, D)`` from `draw_noise`; the sample is then a function of it.
            trajectory: return the whole `HeadTrajectory` instead of the sample.
        """
        if noise is None:
            noise = self.draw_noise(z.shape[0], generator, device=z.device, dtype=z.dtype)
        S = self.num_steps
        if noise.shape != (z.shape[0], S, self.token_dim):
            raise ValueError(
                f"noise must be (n, S, D) = {(z.shape[0], S, self.token_dim)}, got {tuple(noise.shape)}."
            )
        x = noise[:, 0]
        states, means, log_vars = [x], [], []
        for k in range(S):
            i = S - 1 - k
            mean, log_var = self.step_distribution(x, i, z, cfg, z_uncond)
            x = mean if i == 0 else mean + (0.5 * log_var).exp() * noise[:, k + 1] * temperature
            if trajectory:
                states.append(x)
                means.append(mean)
                log_vars.append(log_var)
        if not trajectory:
            return x
        return HeadTrajectory(
            torch.stack(states), torch.stack(means), torch.stack(log_vars), float(temperature)
        )

    # -- training -------------------------------------------------------------------------------
    def loss_terms(
        self, target: Tensor, z: Tensor, timesteps: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The two terms of the loss per token ``(n,)``: the noise MSE and the variational bound.

        ``target`` ``(n, D)`` is diffused to ``timesteps`` ``(n,)`` (of the 1000 training
        steps) with ``noise`` ``(n, D)``. The bound (in bits per number: a KL to the
        true posterior, at ``t = 0`` the discretised decoder likelihood) trains the
        variance with the predicted noise held fixed, as improved DDPM's hybrid loss.
        """
        sched, at = self.train_schedule, self.train_schedule.at
        t = timesteps
        x_t = (
            at("sqrt_alphas_cumprod", t, target) * target
            + at("sqrt_one_minus_alphas_cumprod", t, target) * noise
        )
        eps, v = self.net(x_t, t, z).chunk(2, dim=-1)
        mse = ((noise - eps) ** 2).mean(dim=-1)
        mean, log_var = self._mean_log_variance(sched, x_t, t, eps.detach(), v)
        true_mean = (
            at("posterior_mean_coef1", t, x_t) * target + at("posterior_mean_coef2", t, x_t) * x_t
        )
        true_log_var = at("posterior_log_variance_clipped", t, x_t)
        kl = 0.5 * (
            -1 + log_var - true_log_var + (true_log_var - log_var).exp()
            + (true_mean - mean) ** 2 * (-log_var).exp()
        )  # fmt: skip
        nll = -discretized_gaussian_log_likelihood(target, mean, 0.5 * log_var)
        vb = torch.where(t == 0, nll.mean(dim=-1), kl.mean(dim=-1)) / math.log(2.0)
        return mse, vb

    def loss(
        self,
        target: Tensor,
        z: Tensor,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """MAR's diffusion loss of tokens ``target`` ``(n, D)`` given ``z`` ``(n, Cz)``.

        A random timestep and noise per token (from ``generator``), `loss_terms`
        summed, averaged over the tokens where ``mask`` ``(n,)`` is 1.
        """
        n = target.shape[0]
        t = torch.randint(0, len(self.train_schedule), (n,), generator=generator)
        noise = torch.randn(target.shape, generator=generator, dtype=target.dtype)
        mse, vb = self.loss_terms(target, z, t.to(target.device), noise.to(target.device))
        loss = mse + vb  # (n,)
        if mask is None:
            return loss.mean()
        return (loss * mask).sum() / mask.sum()


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Log-probability of ``x`` in [-1, 1] quantised to 256 levels under a Gaussian (improved DDPM)."""

    def cdf(u: Tensor) -> Tensor:  # the tanh approximation of the normal CDF
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u.pow(3))))

    inv_std = (-log_scale).exp()
    cdf_plus = cdf(inv_std * (x - mean + 1.0 / 255.0))
    cdf_min = cdf(inv_std * (x - mean - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


# ---------------------------------------------------------------------------------------- MAR
class MARModel(nn.Module):
    """MAR's masked encoder/decoder and its diffusion head (see the module docstring).

    The forward pass, `conditions`, maps tokens ``(B, N, D)``, a mask ``(B, N)``
    (True: unknown) and class embeddings ``(B, Ce)`` to the head's conditions
    ``z`` ``(B, N, Cd)``; every row must have the same number of unknown tokens,
    as in MAR. `class_embedding` gives the embedding of class ids, the null
    class (``fake_latent``) for id ``class_num``.
    """

    def __init__(self, config: MARConfig):
        super().__init__()
        self.config = config
        E, Dd, N = config.encoder_embed_dim, config.decoder_embed_dim, config.seq_len
        self.class_emb = nn.Embedding(config.class_num, E)
        self.fake_latent = nn.Parameter(torch.zeros(1, E))
        self.z_proj = nn.Linear(config.token_embed_dim, E)
        self.z_proj_ln = nn.LayerNorm(E, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, N + config.buffer_size, E))
        self.encoder_blocks = nn.ModuleList(
            Block(E, config.encoder_num_heads, config) for _ in range(config.encoder_depth)
        )
        self.encoder_norm = nn.LayerNorm(E, eps=config.norm_eps)
        self.decoder_embed = nn.Linear(E, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, N + config.buffer_size, Dd))
        self.decoder_blocks = nn.ModuleList(
            Block(Dd, config.decoder_num_heads, config) for _ in range(config.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(Dd, eps=config.norm_eps)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, N, Dd))
        self.diffloss = DiffusionHead(config)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAR's initialisation: normal(0.02) embeddings, Xavier linears, zeroed adaLN outputs."""
        for p in (
            self.class_emb.weight, self.fake_latent, self.mask_token,
            self.encoder_pos_embed_learned, self.decoder_pos_embed_learned,
            self.diffusion_pos_embed_learned,
        ):  # fmt: skip
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        net = self.diffloss.net
        nn.init.normal_(net.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(net.time_embed.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in net.res_blocks] + [
            net.final_layer.adaLN_modulation[-1],
            net.final_layer.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # -- tokens ---------------------------------------------------------------------------------
    def patchify(self, latents: Tensor) -> Tensor:
        """Latents ``(B, C, H, W)`` to tokens ``(B, N, C * p * p)``."""
        B, C, H, W = latents.shape
        p = self.config.patch_size
        x = latents.reshape(B, C, H // p, p, W // p, p)
        return torch.einsum("nchpwq->nhwcpq", x).reshape(B, (H // p) * (W // p), C * p * p)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """Tokens ``(B, N, D)`` to latents ``(B, C, H, W)``."""
        B = tokens.shape[0]
        p, h, C = self.config.patch_size, self.config.seq_h, self.config.vae_embed_dim
        x = tokens.reshape(B, h, h, C, p, p)
        return torch.einsum("nhwcpq->nchpwq", x).reshape(B, C, h * p, h * p)

    def class_embedding(self, labels: Tensor) -> Tensor:
        """``(B, Ce)`` embeddings of ids ``(B,)``; id ``class_num`` is the null class (``fake_latent``)."""
        null = labels == self.config.class_num
        emb = self.class_emb(labels.clamp(max=self.config.class_num - 1))
        return torch.where(null[:, None], self.fake_latent.to(emb.dtype), emb)

    # -- the forward pass -----------------------------------------------------------------------
    def _run(self, blocks: nn.ModuleList, x: Tensor) -> Tensor:
        for block in blocks:
            if self.config.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def encode(self, tokens: Tensor, mask: Tensor, class_embedding: Tensor) -> Tensor:
        """The encoder over the buffer and the known tokens: ``(B, buffer + known, Ce)``."""
        B, N, _ = tokens.shape
        x = self.z_proj(tokens)  # (B, N, Ce)
        buffer = class_embedding[:, None].expand(B, self.config.buffer_size, -1).to(x.dtype)
        x = torch.cat((buffer, x), dim=1) + self.encoder_pos_embed_learned
        x = self.z_proj_ln(x)
        keep = torch.cat((mask.new_zeros(B, self.config.buffer_size), mask), dim=1).logical_not()
        x = x[keep].reshape(B, -1, x.shape[-1])  # known positions, in order
        return self.encoder_norm(self._run(self.encoder_blocks, x))

    def decode(self, x: Tensor, mask: Tensor) -> Tensor:
        """The decoder over every position, mask tokens where unknown: ``z`` ``(B, N, Cd)``."""
        B = x.shape[0]
        x = self.decoder_embed(x)
        keep = torch.cat((mask.new_zeros(B, self.config.buffer_size), mask), dim=1).logical_not()
        full = self.mask_token.to(x.dtype).expand(B, keep.shape[1], -1).clone()
        full[keep] = x.reshape(-1, x.shape[-1])
        x = self.decoder_norm(self._run(self.decoder_blocks, full + self.decoder_pos_embed_learned))
        return x[:, self.config.buffer_size :] + self.diffusion_pos_embed_learned

    def conditions(self, tokens: Tensor, mask: Tensor, class_embedding: Tensor) -> Tensor:
        """One forward: the head's conditions ``z`` ``(B, N, Cd)`` at every position.

        Args:
            tokens: ``(B, N, D)``; values at unknown positions are ignored.
            mask: ``(B, N)`` bool, True where the token is unknown; the same count in every row.
            class_embedding: ``(B, Ce)`` from `class_embedding`.
        """
        counts = mask.sum(dim=1)
        if bool((counts != counts[0]).any()):
            raise ValueError(
                f"every row needs the same number of unknown tokens, got {counts.tolist()}."
            )
        return self.decode(self.encode(tokens, mask.bool(), class_embedding), mask.bool())

    forward = conditions

    # -- training -------------------------------------------------------------------------------
    def training_loss(
        self, tokens: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """MAR's training loss on clean tokens ``(B, N, D)`` of classes ``labels`` ``(B,)``.

        A random order per row, one masking ratio per batch from the truncated
        normal, labels dropped to the null class with ``label_drop_prob``; the
        diffusion loss on the masked tokens, each drawn ``diffusion_batch_mul`` times.
        """
        cfg = self.config
        B, N, D = tokens.shape
        orders = torch.stack([torch.randperm(N, generator=generator) for _ in range(B)])
        # normal(1, 0.25) truncated to [mask_ratio_min, 1], by its inverse CDF
        normal = torch.distributions.Normal(0.0, 1.0)
        lo = normal.cdf(torch.tensor((cfg.mask_ratio_min - 1.0) / 0.25))
        u = lo + (0.5 - lo) * torch.rand((), generator=generator)
        ratio = 1.0 + 0.25 * float(normal.icdf(u))
        num_masked = min(N, math.ceil(N * ratio))
        mask = torch.zeros(B, N, dtype=torch.bool)
        mask.scatter_(1, orders[:, :num_masked], True)
        mask = mask.to(tokens.device)
        drop = torch.rand(B, generator=generator) < cfg.label_drop_prob
        labels = torch.where(drop.to(labels.device), cfg.class_num, labels)
        z = self.conditions(tokens, mask, self.class_embedding(labels))  # (B, N, Cd)
        mul = cfg.diffusion_batch_mul
        return self.diffloss.loss(
            tokens.reshape(B * N, D).repeat(mul, 1),
            z.reshape(B * N, -1).repeat(mul, 1),
            mask.reshape(B * N).repeat(mul).to(tokens.dtype),
            generator=generator,
        )

    # -- files ----------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=1) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, folder / WEIGHTS_FILE)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, torch_dtype: torch.dtype | None = None
    ) -> MARModel:
        """Load a folder written by `save_pretrained` (every weight must be there, no other)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise ValueError(
                f"{folder} is not a MAR model folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}."
            )
        config = MARConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
        with torch.device("meta"):
            model = cls(config)
        state = load_file(folder / WEIGHTS_FILE)
        model.load_state_dict(state, strict=True, assign=True)
        if torch_dtype is not None:
            model.to(torch_dtype)
        return model.eval()
