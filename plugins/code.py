"""CoDe, from "Collaborative Decoding Makes Visual Auto-Regressive Modeling Efficient" (arXiv:2411.17787).

A VAR model predicts an image scale by scale (``patch_nums`` 1, 2, 3, 4, 5, 6,
8, 10, 13, 16 for the released models). The early, small scales decide the
content and need a large model; the late, large scales hold most of the tokens
(255 of 680 tokens in the first eight scales, 425 in the last two) but only
refine detail. CoDe lets the pipeline's model (the *drafter*) make the first
``draft_steps`` scales and a smaller model (the *refiner*) the rest: at its entry
scale the refiner reads every earlier scale in one block-causal prefill (the
token maps the drafter sampled, as next-scale inputs) after the drafter's K/V
are freed, and samples from its entry scale on, with the same per-row
generators. The paper: 1.7x at FID 1.95 -> 1.98 (VAR-d30 drafter, d16 refiner,
8 drafter scales), 2.9x at FID 2.27 (6 drafter scales), about half the memory.

decodekit's VAR loop (`decodekit.pipelines.var.ScaleDecoder`) does the hand-over;
this strategy only plans it (``decodekit_scale_models``: the refiner from scale
``draft_steps`` on) and measures each model's share (``decodekit_scale_end``).

Where it differs from the reference code (czg1225/CoDe, ``models/var.py``,
``autoregressive_infer_cfg_refine``): the reference re-seeds the refiner's
generator with the drafter's seed and draws new tokens for every earlier scale
at the entry scale (thrown away, but they consume the stream), so its refiner
samples with other random numbers than one model would, and drafter == refiner
does not reproduce plain VAR. Here the generators run on across the switch,
so drafter == refiner gives plain VAR bit for bit (tests/test_code.py). The
reference also fine-tunes a drafter/refiner pair per split ("specialised"
checkpoints); this runs any pair that fits, training-free (the released VAR
checkpoints as they are) or trained for it (the zoo's refiner, shapes-var-d3, is
trained on its own scales only).

Reproduced: the exactness properties (tests/test_code.py). Measured:
docs/strategies/code.md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from decodekit.errors import ConfigError
from decodekit.hookspecs import hookimpl
from decodekit.second_model import check_second_model, same_weights
from decodekit.strategy import Params, Strategy
from pydantic import Field, field_validator

MAX_SCALES = 64
"""More scales than this is surely a mistake (VAR has 10)."""


class CoDeParams(Params):
    """Parameters of `code` (the paper's best trade-off: 8 drafter scales of 10, VAR-d16 refiner)."""

    refiner: Any = Field(
        description="The model of the last scales: zoo:<name> or a folder (a var folder with "
        "transformer/, or a VARTransformer folder with config.json), or, from Python, a "
        "VARTransformer on the pipeline's device and dtype. It must share the pipeline's "
        "patch_nums, vocab_size, vae_embed_dim and num_classes.",
    )
    draft_steps: int = Field(
        ge=0,
        le=MAX_SCALES,
        description="Scales made by the pipeline's model (the drafter) before the refiner takes "
        "over, 0 .. K (paper: 8 of 10; 0 runs the refiner alone, K the drafter alone).",
    )

    @field_validator("refiner")
    @classmethod
    def _refiner(cls, v: Any) -> Any:
        if isinstance(v, str):
            if not v.strip():
                raise ValueError("empty; give zoo:<name>, a folder, or a VARTransformer")
            return v
        if isinstance(v, Path):
            return str(v)
        from decodekit.pipelines.var import VARTransformer

        if not isinstance(v, VARTransformer):
            raise ValueError(
                f"expected zoo:<name>, a folder or a VARTransformer, got {type(v).__name__}"
            )
        return v


def load_refiner(source: str, path: str, pipe: Any) -> Any:
    """The `VARTransformer` of ``source`` (zoo:<name>, a var folder or a transformer folder).

    Loaded on the device and in the dtype of ``pipe``'s transformer. A var folder's
    ``vq/`` must hold the pipeline's VQ-VAE: a refiner learnt another one's tokens.
    """
    from decodekit.config import resolve_model
    from decodekit.pipelines.var import VARTransformer

    weight = next(pipe.transformer.parameters())
    folder = Path(resolve_model(source, path=path))
    if (folder / "transformer" / "config.json").is_file():
        check_same_vq(folder / "vq", pipe.vq, path)
        folder = folder / "transformer"
    elif not (folder / "config.json").is_file():
        raise ConfigError(
            path,
            f"{str(folder)!r} holds no VAR transformer: give a var folder (with transformer/) "
            "or a VARTransformer folder (config.json and diffusion_pytorch_model.safetensors), "
            "as VARPipeline.save_pretrained or `decodekit convert-var` write them",
        )
    try:
        model = VARTransformer.from_pretrained(folder, torch_dtype=weight.dtype)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(path, f"cannot load a VARTransformer from {str(folder)!r}: {e}") from None
    return model.to(weight.device).eval()


def check_same_vq(folder: Path, vq: Any, path: str) -> None:
    """Refuse a var folder whose ``vq/`` weights are not ``vq``'s (to float16 precision)."""
    if not same_weights(folder / "model.safetensors", vq):
        raise ConfigError(
            path,
            f"the refiner's folder holds another VQ-VAE ({str(folder)!r}) than the pipeline's; "
            "a refiner predicts the tokens of the VQ-VAE it was trained on, so it must share "
            "the pipeline's (the same vq/ weights)",
        )


def forward_flops(model: Any, first: int, last: int) -> int:
    """Matmul FLOPs of one row of one forward of ``model`` over scales ``first .. last - 1``.

    The K/V of scales ``0 .. first - 1`` are cached. Attention is computed densely
    over every key of scales ``0 .. last - 1`` (a prefill's block-causal mask hides
    some of them but does not skip their products), and the head runs on every
    token of the span (a prefill's too), as `VARTransformer.logits_for_scales`
    computes them. Counted: ``word_embed``, QKV, attention scores and values, the
    projection, the MLP, the head, and once per row the adaptive-LN projections;
    not counted: norms, activations, softmax, sampling, the VQ.
    """
    cfg = model.config
    C, V, Cv = cfg.embed_dim, cfg.vocab_size, cfg.vae_embed_dim
    H = round(C * cfg.mlp_ratio)
    spans = model.begin_ends
    keys = spans[last - 1][1]  # every query of the span attends to all of them
    total = 0
    for s in range(first, last):
        n = spans[s][1] - spans[s][0]  # tokens of scale s
        per_token = 2 * C * 3 * C + 2 * C * C + 4 * C * H + 4 * keys * C  # one block
        total += n * (cfg.depth * per_token + 2 * C * V + (2 * Cv * C if s > 0 else 0))
    ada = 2 * C * 6 * C * (1 if cfg.shared_aln else cfg.depth) + 2 * C * 2 * C  # per row
    return total + ada


def plan_flops(models: list[Any]) -> int:
    """Matmul FLOPs of one row of a call whose scale ``s`` is run by ``models[s]``.

    A model that did not run the scale before is prefilled over every earlier
    scale in the forward of its entry scale, as `ScaleDecoder` does.
    """
    total, previous = 0, None
    for s, model in enumerate(models):
        total += forward_flops(model, 0 if model is not previous else s, s + 1)
        previous = model
    return total


class CoDe(Strategy):
    """Collaborative decoding: the pipeline's VAR model drafts the first scales, a refiner the rest."""

    name = "code"
    loops = ("scale-autoregression",)
    Params = CoDeParams
    slot = "scale-models"
    paper = (
        "Collaborative Decoding Makes Visual Auto-Regressive Modeling Efficient, arXiv:2411.17787"
    )

    def __init__(self, params=None, *, path: str = "params", **kwargs):
        super().__init__(params, path=path, **kwargs)
        self.path = path
        self.refiner: Any = None
        self._last: dict[str, Any] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def on_attach(self, run) -> None:
        adapter = run.adapter
        pipe, drafter = adapter.pipe, adapter.transformer
        K = adapter.num_scales
        if self.params.draft_steps > K:
            raise ConfigError(
                f"{self.path}.draft_steps",
                f"{self.params.draft_steps} is more than this pipeline's {K} scales; "
                f"give 0 .. {K} (0: the refiner alone, {K}: the drafter alone)",
            )
        refiner = self.params.refiner
        if isinstance(refiner, str):
            refiner = load_refiner(refiner, f"{self.path}.refiner", pipe)
        check_second_model(refiner, drafter, pipe, "the refiner", f"{self.path}.refiner")
        self.refiner, self.drafter = refiner, drafter
        self.reset(run)

    def on_detach(self, run) -> None:
        self.refiner = self.drafter = None

    def reset(self, run) -> None:
        self._last = {}
        self._roles: dict[str, dict[str, Any]] = {}
        self._seconds: dict[str, float] = {}
        self._previous: Any = None  # the model of the last scale run
        self._mark = time.perf_counter()

    def stats(self) -> dict[str, Any]:
        return dict(self._last)

    def ideal_speedup(self, run) -> float | None:
        # matmul FLOPs of the drafter alone over those of the drafter/refiner plan,
        # per row (guidance doubles both); the same for every call
        if self.refiner is None:
            return None
        K, n = len(self.drafter.patch_nums), self.params.draft_steps
        plan = [self.drafter] * n + [self.refiner] * (K - n)
        return plan_flops([self.drafter] * K) / plan_flops(plan)

    # -- hooks -------------------------------------------------------------------------------
    @hookimpl
    def decodekit_scale_models(self, run, plan):
        n = self.params.draft_steps
        plan.models[n:] = [self.refiner] * (len(plan.models) - n)
        self._sync(run)
        self._mark = time.perf_counter()

    @hookimpl
    def decodekit_scale_end(self, run, scale, model, tokens):
        decoder = run.adapter.decoder
        n, K = self.params.draft_steps, len(decoder.patch_nums)
        role = "drafter" if scale < n else "refiner"
        entered = model is not self._previous and scale > 0  # its entry forward prefilled
        self._previous = model
        per = self._roles.get(role)
        if per is None:
            per = self._roles[role] = {
                "scales": 0,
                "forwards": 0,
                "prefill_tokens": model.begin_ends[scale - 1][1] if entered else 0,
                "kv_bytes": 0,
                "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            }
            if tokens.device.type == "cuda":
                per["cuda_allocated_bytes"] = 0
        per["scales"] += 1
        per["forwards"] += 1  # the entry forward, prefill included, is one
        per["kv_bytes"] = max(per["kv_bytes"], _kv_bytes(model, decoder, scale))
        if "cuda_allocated_bytes" in per:  # live memory between forwards; no peak reset
            allocated = torch.cuda.memory_allocated(tokens.device)
            per["cuda_allocated_bytes"] = max(per["cuda_allocated_bytes"], allocated)
        if scale in (n - 1, K - 1):  # the end of this model's span
            self._sync(run)
            now = time.perf_counter()
            self._seconds[role] = self._seconds.get(role, 0.0) + now - self._mark
            self._mark = now
        if scale == K - 1:
            self._last = {
                "draft_steps": n,
                "models": {r: dict(v) for r, v in self._roles.items()},
                "seconds_s": dict(self._seconds),
            }

    @staticmethod
    def _sync(run) -> None:
        device = run.adapter.transformer.device
        if device.type == "cuda":  # time the span, not the launch
            torch.cuda.synchronize(device)


def _kv_bytes(model: Any, decoder: Any, scale: int) -> int:
    """Bytes of ``model``'s keys and values once scale ``scale`` is done (every block)."""
    cache = decoder.cache
    if cache is not None and decoder.model is model:
        return sum(t.numel() * t.element_size() for t in cache.keys + cache.values if t is not None)
    # the last scale frees the cache; it then held K/V of every token of scales 0 .. scale
    rows = decoder.batch * (2 if decoder.guided else 1)
    tokens = model.begin_ends[scale][1]
    width = model.config.embed_dim * next(model.parameters()).element_size()
    return 2 * len(model.blocks) * rows * tokens * width


@hookimpl
def decodekit_register_strategies(register):
    register(CoDe)
