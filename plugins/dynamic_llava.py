"""Dynamic-LLaVA, from "Dynamic-LLaVA: Efficient Multimodal Large Language Models via Dynamic
Vision-language Context Sparsification" (arXiv:2412.00876).

Two learned predictors read the language model's hidden states at the input of
layer K (`decodekit.predictors`):

- prefill: the image predictor scores every image token; the top ``keep_ratio``
  of each row's image tokens and every text token go on to layers K and later,
  keeping their original position ids (the paper: K = 2, 20% of the image kept);
- decode: the output-text predictor decides for each new token whether its K/V
  enter the cache of layers K and later (``decode_admission``; kept where its
  keep probability exceeds ``text_threshold``, the reference's 0.5).

Predictors come from ``decodekit train-predictor`` (the reference's weights were
never released); ``predictor: zoo:<name>`` reads the one saved beside a zoo
model. Without a predictor the image tokens are ranked by a training-free score,
the L2 norm of their hidden states at the input of layer K (no attention weights
needed, so sdpa runs untouched), and decode admission is off.

How it attaches: `decodekit.token_pruning.TokenPruner` on the language model, as
`fastv` does (this class reuses its image-token bookkeeping, per-row top share
and FLOPs estimate), with the selection made from the predictor's scores.

Where it differs from the reference code (Osilly/dynamic_llava): each row of a
batch keeps its own image tokens (the reference applies row 0's image layout to
every row); the predictors are trained with the VLM frozen (the reference also
fine-tunes the LLM); the kept count is ``ceil(keep_ratio * N)`` (the reference
floors it).
"""

from __future__ import annotations

from typing import Any

import torch
from decodekit.errors import ConfigError
from decodekit.hookspecs import hookimpl
from decodekit.predictors import Predictors, check_predictors_fit, load_predictors, predictor_folder
from decodekit.strategy import Params
from decodekit.token_pruning import TokenPruner
from pydantic import Field

from .fastv import FastV

DEFAULT_LAYER = 2


class DynamicLLaVAParams(Params):
    """Parameters of `dynamic-llava`."""

    layer: int = Field(
        DEFAULT_LAYER,
        ge=1,
        description="K: layers K and later run on the kept tokens (paper: K = 2); a predictor "
        "works at the layer it was trained for",
    )
    keep_ratio: float = Field(
        0.2,
        gt=0.0,
        le=1.0,
        description="share of each row's image tokens kept after layer K (paper: 0.2); at least one",
    )
    predictor: str | None = Field(
        None,
        description="a predictor folder (decodekit train-predictor) or zoo:<model> for the one "
        "beside a zoo model; none: rank image tokens by their hidden states' L2 norm at layer K",
    )
    decode_admission: bool = Field(
        True,
        description="let the output-text predictor decide which decoded tokens' K/V enter the "
        "cache of layers K and later (needs a predictor)",
    )
    text_threshold: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="a decoded token's K/V are cached when the text predictor's keep probability "
        "exceeds this (reference: 0.5)",
    )


class DynamicLLaVA(FastV):
    """Keep the image tokens a learned predictor ranks highest after layer K; admit decoded K/V by
    a second predictor (see the module doc)."""

    name = "dynamic-llava"
    Params = DynamicLLaVAParams
    paper = (
        "Dynamic-LLaVA: Efficient Multimodal Large Language Models via Dynamic Vision-language "
        "Context Sparsification, arXiv:2412.00876"
    )

    def on_attach(self, run) -> None:
        model = run.adapter.model
        self._read_model(model)
        p = self.params
        self.predictors: Predictors | None = None
        if p.predictor is not None:
            where = "strategies.dynamic-llava.params.predictor"
            predictors = load_predictors(predictor_folder(p.predictor, where), where)
            check_predictors_fit(predictors, self._widths[0], self._layers, where)
            trained = predictors.config.layer
            if p.layer != trained:
                raise ConfigError(
                    "strategies.dynamic-llava.params.layer",
                    f"the predictor was trained on layer {trained}'s input, not layer {p.layer}'s; "
                    f"set layer: {trained} or train a predictor for layer {p.layer}",
                )
            weight = next(model.parameters())
            self.predictors = predictors.to(device=weight.device, dtype=weight.dtype)
        admit = self._admit if p.decode_admission and self.predictors is not None else None
        self.pruner = TokenPruner(model, p.layer, self._select, None, admit=admit)
        self.pruner.attach()
        self.reset(run)

    def on_detach(self, run) -> None:
        self._cache_at_detach = self.pruner.cache_stats()  # detaching resets the pruner's counts
        super().on_detach(run)

    def reset(self, run) -> None:
        super().reset(run)
        self._stats.update(decoded=0, admitted=0)
        self._cache_at_detach = None

    @torch.no_grad()
    def _image_scores(self, image: torch.Tensor) -> torch.Tensor:
        """Keep scores ``(B, N)`` of the image tokens' hidden states ``(B, N, D)`` at layer K's input."""
        if self.predictors is None:
            return image.float().norm(dim=-1)
        return self.predictors.image_scores(image)

    def _select(self, scores: Any, hidden: torch.Tensor) -> torch.Tensor:
        B, L = hidden.shape[:2]
        if self._image is None or self._image.shape != (B, L):
            raise RuntimeError(
                "dynamic-llava: the prefill forward's input_ids were not seen (call the model "
                "through generate with input_ids)"
            )
        full = torch.full((B, L), float("-inf"), device=hidden.device)
        counts = self._image.sum(1)
        if int(counts.min()) == int(counts.max()) and int(counts[0]) > 0:
            image = hidden[self._image].view(B, int(counts[0]), -1)  # (B, N, D), row order
            full[self._image] = self._image_scores(image).flatten().to(full.dtype)
        return super()._select(full, hidden)  # FastV's per-row top share (and its checks)

    @torch.no_grad()
    def _admit(self, hidden: torch.Tensor) -> torch.Tensor:
        """Decode step: ``(B,)`` True where the new token's K/V (hidden ``(B, 1, D)``) are cached."""
        keep = self.predictors.text_keep_probability(hidden[:, -1]) > self.params.text_threshold
        self._stats["decoded"] += keep.numel()
        self._stats["admitted"] += keep.sum()  # a device tensor: read once, in stats()
        return keep

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        s = self._stats
        out.update(
            layer=self.params.layer,
            scorer="predictor" if self.predictors is not None else "l2-norm",
            decode_tokens=s["decoded"],
            decode_tokens_admitted=int(s["admitted"]),
        )
        cache = self._cache_at_detach
        out["cache"] = cache if cache is not None else self.pruner.cache_stats()
        return out


@hookimpl
def decodekit_register_strategies(register):
    register(DynamicLLaVA)
