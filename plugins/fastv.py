"""FastV, from "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration
for Large Vision-Language Models" (arXiv:2403.06764).

After layer K of the language model, only a share of the image tokens goes on:
at the prefill forward, layer K - 1 runs eager attention and its weights rank
the image tokens, by the last token's attention row (``score: last``, the
paper's rule) or by the mean over the text tokens' rows (``score: text-mean``),
averaged over heads. The top ``keep_ratio`` of each row's image tokens and
every text token go on to layers K and later; they keep their original
position ids, and those layers cache the kept tokens' K/V only, so decode steps
attend to the kept context too. Layers before K see everything.

How it attaches: `decodekit.token_pruning.TokenPruner` on the language model
(a decodekit attention function registered with transformers'
``AttentionInterface`` plus forward pre-hooks on layers K and later), with the
image positions read from the prefill forward's ``input_ids``.

Where it differs from the reference code (pkunlp-icler/FastV): batch > 1 with
each row ranking its own image tokens (the reference is batch 1), the kept
tokens' K/V cached per layer from K on (the reference's cache variant reuses one
layer's pruned cache and renumbers positions compactly; here positions stay
the original ones), and ``keep_ratio`` names the share kept (the paper's R is
the share dropped; at the paper's R = 50% the two agree).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from decodekit.errors import AttachError
from decodekit.hookspecs import hookimpl
from decodekit.strategy import Params, Strategy
from decodekit.token_pruning import TokenPruner, text_decoder
from pydantic import Field


class FastVParams(Params):
    """Parameters of `fastv`."""

    layer: int = Field(
        2, ge=1, description="K: layers K and later run on the kept tokens (paper: K = 2)"
    )
    keep_ratio: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="share of each row's image tokens kept after layer K (paper: R = 50% dropped, "
        "so 0.5 kept); at least one image token is kept",
    )
    score: Literal["last", "text-mean"] = Field(
        "last",
        description="rank image tokens by layer K-1's attention from the last token (last, the "
        "paper's) or the mean over the text tokens (text-mean), averaged over heads",
    )


def prefill_flops(layers: int, tokens_per_layer: list[int], hidden: int, ffn: int) -> float:
    """FastV's FLOPs estimate of a prefill: sum over layers of 4 n d^2 + 2 n^2 d + 2 n d m."""
    return float(
        sum(4 * n * hidden**2 + 2 * n * n * hidden + 2 * n * hidden * ffn for n in tokens_per_layer)
    )


class FastV(Strategy):
    """Drop the least-attended image tokens after layer K (see the module doc)."""

    name = "fastv"
    loops = ("token-autoregression",)
    Params = FastVParams
    slot = "context"
    paper = (
        "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for "
        "Large Vision-Language Models, arXiv:2403.06764"
    )

    def on_attach(self, run) -> None:
        model = run.adapter.model
        self._read_model(model)
        self.pruner = TokenPruner(model, self.params.layer, self._select, self._score)
        self.pruner.attach()
        self.reset(run)

    def _read_model(self, model: Any) -> None:
        """The image token id, the decoder's widths and depth; refuses a model without image
        tokens and a ``layer`` at or past the last."""
        image_id = getattr(
            model.config, "image_token_id", getattr(model.config, "image_token_index", None)
        )
        if image_id is None:
            raise AttachError(
                f"{self.name} prunes image tokens; {type(model).__name__} has no image_token_id "
                "(attach it to a vision-language model, pipeline type vlm)."
            )
        self.image_id = int(image_id)
        decoder = text_decoder(model)
        self._widths = (decoder.config.hidden_size, decoder.config.intermediate_size)
        self._layers = len(decoder.layers)
        if self.params.layer >= self._layers:
            raise AttachError(
                f"{self.name} layer must be below the language model's {self._layers} layers, "
                f"got {self.params.layer}"
            )

    def on_detach(self, run) -> None:
        self.pruner.detach()

    def reset(self, run) -> None:
        self.pruner.reset()
        self._image = None  # (B, L) bool: image positions of the current call's prompt
        self._text = None  # (B, L) bool: text positions (not image, not padding)
        self._stats = {
            "calls": 0,
            "image_tokens": 0,
            "image_tokens_kept": 0,
            "flops": 0.0,
            "flops_full": 0.0,
        }

    @hookimpl
    def decodekit_model_inputs(self, run, step, model_inputs):
        ids = model_inputs.get("input_ids")
        cache = model_inputs.get("past_key_values", model_inputs.get("cache"))
        prefill = cache is None or cache.get_seq_length() == 0
        if ids is None or not prefill:
            return
        self._image = ids == self.image_id
        mask = model_inputs.get("attention_mask")
        valid = mask.bool() if mask is not None else torch.ones_like(self._image)
        self._text = valid & ~self._image

    def _score(self, weights: torch.Tensor) -> torch.Tensor:
        """Per-position scores ``(B, L)`` from layer K-1's weights ``(B, H, L, L)``."""
        w = weights.float().mean(1)  # (B, L, L): mean over heads
        if self.params.score == "last":
            return w[:, -1]
        rows = self._text[:, : w.shape[1]].float()  # (B, L) queries averaged over
        return (w * rows[..., None]).sum(1) / rows.sum(1, keepdim=True).clamp(min=1)

    def _select(self, scores: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
        B, L = hidden.shape[:2]
        if self._image is None or self._image.shape != (B, L):
            raise RuntimeError(
                "fastv: the prefill forward's input_ids were not seen (call the model through "
                "generate with input_ids)"
            )
        counts = self._image.sum(1)
        if bool((counts != counts[0]).any()):
            raise RuntimeError(
                f"fastv keeps the same number of tokens in every row; rows have {counts.tolist()} "
                "image tokens (give each row the same number of images)"
            )
        n = int(counts[0])
        k = max(1, math.ceil(self.params.keep_ratio * n)) if n else 0
        keep = ~self._image.clone()
        if n:
            ranked = scores.float().masked_fill(~self._image, -math.inf)
            keep.scatter_(1, ranked.topk(k, dim=1).indices, True)
        positions = torch.arange(L, device=hidden.device).expand(B, L)
        index = positions[keep].view(B, L - n + k)  # row-major: each row's kept, ascending
        self._count(B, L, n, k)
        return index

    def _count(self, rows: int, length: int, n: int, k: int) -> None:
        hidden, ffn = self._widths
        K = self.params.layer
        kept = length - n + k
        s = self._stats
        s["calls"] += 1
        s["image_tokens"] += rows * n
        s["image_tokens_kept"] += rows * k
        s["flops"] += rows * prefill_flops(
            self._layers, [length] * K + [kept] * (self._layers - K), hidden, ffn
        )
        s["flops_full"] += rows * prefill_flops(self._layers, [length] * self._layers, hidden, ffn)

    def stats(self) -> dict[str, Any]:
        s = self._stats
        return {
            "image_tokens": s["image_tokens"],
            "image_tokens_kept": s["image_tokens_kept"],
            "prefill_flops": s["flops"],
            "prefill_flops_full": s["flops_full"],
            "prefill_flops_ratio": s["flops"] / s["flops_full"] if s["flops_full"] else None,
        }

    def ideal_speedup(self, run) -> float | None:
        s = self._stats
        return s["flops_full"] / s["flops"] if s["flops"] else None


@hookimpl
def decodekit_register_strategies(register):
    register(FastV)
