"""Dynamic-LLaVA's token predictors: which image tokens go on after layer K, which decoded tokens
enter the K/V cache.

From "Dynamic-LLaVA: Efficient Multimodal Large Language Models via Dynamic
Vision-language Context Sparsification" (arXiv:2412.00876). Both predictors read
the language model's hidden states at the *input* of layer K and give two logits
per token, ``(keep, drop)``:

- `ImagePredictor` (prefill): a LayerNorm, a down projection to ``d_model`` and
  GELU, ``layers`` pre-norm transformer encoder blocks over the image tokens, then
  each token's first ``d_model / 2`` channels are joined with the mean over the
  image tokens of the other half (a global feature of the image), and an MLP
  ``d_model -> d_model/2 -> d_model/4 -> 2`` scores it.
- `TextPredictor` (decode): a LayerNorm and an MLP ``hidden -> d_model ->
  d_model/2 -> d_model/4 -> 2`` on one token's hidden state.

A predictor folder holds ``predictor.safetensors`` (keys ``image.*`` and
``text.*``) and ``predictor.json`` (`PredictorConfig`); `load_predictors` checks
both and says what is wrong.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

WEIGHTS = "predictor.safetensors"
CONFIG = "predictor.json"
FORMAT = "decodekit-dynamic-llava-predictor"


@dataclass
class PredictorConfig:
    """Sizes of a predictor pair and the setting it was trained for.

    Attributes:
        hidden_size: the language model's hidden size (the predictors' input width).
        layer: K, the decoder layer whose input the predictors read (paper: 2).
        d_model: the predictors' width (reference: 512 for a 4096-wide LLM).
        heads: attention heads of the image predictor's encoder blocks (reference: 8).
        ffn: feed-forward width of those blocks (reference: 2048).
        layers: encoder blocks of the image predictor (reference: 2).
        image_keep_ratio: the image keep rate it was trained toward (paper: 0.2).
        text_keep_ratio: the decoded-token keep rate it was trained toward (reference: 0.5).
    """

    hidden_size: int
    layer: int = 2
    d_model: int = 512
    heads: int = 8
    ffn: int = 2048
    layers: int = 2
    image_keep_ratio: float = 0.2
    text_keep_ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.d_model < 4 or self.d_model % 4:
            raise ValueError(f"d_model must be a multiple of 4 (>= 4), got {self.d_model}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by heads {self.heads}")


def _mlp_head(width: int) -> nn.Sequential:
    """``width -> width/2 -> width/4 -> 2`` with GELUs: the (keep, drop) logits."""
    return nn.Sequential(
        nn.Linear(width, width // 2),
        nn.GELU(),
        nn.Linear(width // 2, width // 4),
        nn.GELU(),
        nn.Linear(width // 4, 2),
    )


class ImagePredictor(nn.Module):
    """(keep, drop) logits for each image token from its hidden state and the image's global feature."""

    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        d = cfg.d_model
        self.down = nn.Sequential(
            nn.LayerNorm(cfg.hidden_size), nn.Linear(cfg.hidden_size, d), nn.GELU()
        )
        block = nn.TransformerEncoderLayer(
            d, cfg.heads, cfg.ffn, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, cfg.layers, enable_nested_tensor=False)
        self.head = _mlp_head(d)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` ``(B, N, hidden)`` -> logits ``(B, N, 2)``."""
        x = self.blocks(self.down(image))  # (B, N, d)
        half = x.shape[-1] // 2
        local, rest = x[..., :half], x[..., half:]
        glob = rest.mean(1, keepdim=True).expand_as(rest)  # (B, N, d/2): the image's mean
        return self.head(torch.cat([local, glob], -1))


class TextPredictor(nn.Module):
    """(keep, drop) logits for each token from its own hidden state."""

    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        d = cfg.d_model
        self.net = nn.Sequential(
            nn.LayerNorm(cfg.hidden_size), nn.Linear(cfg.hidden_size, d), nn.GELU(), _mlp_head(d)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``(..., hidden)`` -> logits ``(..., 2)``."""
        return self.net(hidden)


class Predictors(nn.Module):
    """The image and output-text predictors of one language model, with their config."""

    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.config = cfg
        self.image = ImagePredictor(cfg)
        self.text = TextPredictor(cfg)

    def image_scores(self, image: torch.Tensor) -> torch.Tensor:
        """Keep score ``(B, N)`` of each image token (log-odds of keep); higher is kept first."""
        logits = self.image(image).float()
        return logits[..., 0] - logits[..., 1]

    def text_keep_probability(self, hidden: torch.Tensor) -> torch.Tensor:
        """Keep probability ``(...)`` of each token whose hidden state is ``hidden`` ``(..., D)``."""
        return self.text(hidden).float().softmax(-1)[..., 0]


def keep_fraction(decisions: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row mean of 0/1 ``decisions`` ``(B, N)`` over ``valid`` positions: ``(B,)``."""
    if valid is None:
        return decisions.mean(1)
    v = valid.to(decisions.dtype)
    return (decisions * v).sum(1) / v.sum(1).clamp(min=1)


def gumbel_keep(
    logits: torch.Tensor, tau: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Hard keep decisions ``(...)`` from (keep, drop) ``logits`` ``(..., 2)``: Gumbel-softmax,
    one-hot forward, the soft sample's gradient backward (straight-through)."""
    log_p = logits.float().log_softmax(-1)
    u = torch.rand(log_p.shape, generator=generator, device=log_p.device).clamp(1e-10, 1 - 1e-7)
    soft = ((log_p - torch.log(-torch.log(u))) / tau).softmax(-1)  # (..., 2)
    hard = (soft[..., 0] >= soft[..., 1]).to(soft.dtype)
    return (hard - soft[..., 0].detach() + soft[..., 0]).to(logits.dtype)


def keep_rate_loss(
    decisions: torch.Tensor, target: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """The paper's keep-rate loss: mean over rows of ``(target - row keep fraction)^2``."""
    return ((target - keep_fraction(decisions, valid)) ** 2).mean()


# -- files ------------------------------------------------------------------------------------
def save_predictors(predictors: Predictors, folder: str | os.PathLike) -> Path:
    """Write ``predictor.safetensors`` and ``predictor.json`` into ``folder`` (created)."""
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in predictors.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": FORMAT})
    (out / CONFIG).write_text(
        json.dumps({"format": FORMAT, **asdict(predictors.config)}, indent=2) + "\n"
    )
    return out


def load_predictors(folder: str | os.PathLike, where: str = "predictor") -> Predictors:
    """Read a predictor folder written by `save_predictors`; errors name ``where`` and the problem."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(
            where,
            f"no predictor folder at {str(path)!r}; `decodekit train-predictor MODEL --out "
            f"{str(path)!r}` writes one",
        )
    missing = [n for n in (CONFIG, WEIGHTS) if not (path / n).is_file()]
    if missing:
        raise ConfigError(
            where,
            f"{str(path)!r} lacks {', '.join(missing)}; a predictor folder is what "
            "`decodekit train-predictor` writes",
        )
    try:
        raw = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(where, f"{CONFIG} in {str(path)!r} is not readable JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ConfigError(
            where, f"{CONFIG} in {str(path)!r} is not a Dynamic-LLaVA predictor config"
        )
    known = {f.name for f in fields(PredictorConfig)}
    try:
        cfg = PredictorConfig(**{k: v for k, v in raw.items() if k in known})
    except (TypeError, ValueError) as e:
        raise ConfigError(where, f"{CONFIG} in {str(path)!r}: {e}") from None
    predictors = Predictors(cfg)
    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ConfigError(where, f"{WEIGHTS} in {str(path)!r} is not readable ({e})") from None
    expected = predictors.state_dict()
    wrong = sorted(set(expected) ^ set(state))
    if wrong:
        raise ConfigError(
            where,
            f"{WEIGHTS} does not match {CONFIG}: tensors missing or extra: {', '.join(wrong[:4])}",
        )
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ConfigError(
                where,
                f"{WEIGHTS}: {k} has shape {tuple(v.shape)}, {CONFIG} says {tuple(expected[k].shape)}",
            )
    predictors.load_state_dict(state)
    return predictors.eval()


def check_predictors_fit(predictors: Predictors, hidden_size: int, layers: int, where: str) -> None:
    """Refuse predictors whose input width or layer do not fit a language model."""
    cfg = predictors.config
    if cfg.hidden_size != hidden_size:
        raise ConfigError(
            where,
            f"the predictor reads hidden states of width {cfg.hidden_size}, this language model's "
            f"are {hidden_size}; train one for this model with `decodekit train-predictor`",
        )
    if not 1 <= cfg.layer < layers:
        raise ConfigError(
            where, f"the predictor was trained at layer {cfg.layer}; this model has {layers} layers"
        )


def predictor_folder(spec: str, where: str = "predictor") -> Path:
    """The folder of ``spec``: a path, or ``zoo:<name>`` for the predictor saved beside a zoo model."""
    if spec.startswith("zoo:"):
        from .config import _resolve_zoo

        return Path(_resolve_zoo(spec[4:], where)) / "predictor"
    return Path(spec)


def describe(predictors: Predictors) -> dict[str, Any]:
    """The config as a dict plus the parameter count (for stats and training records)."""
    return {
        **asdict(predictors.config),
        "parameters": sum(p.numel() for p in predictors.parameters()),
    }
