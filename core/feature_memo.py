"""Features stored per loop step index: `StepFeatureMemo`.

Encoder-reuse strategies (Faster-Diffusion, DeepCache) compute features at
some steps of a denoising loop and read them back at later steps. The memo keys
them by the loop's step *index*, never by timestep value.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from .kv_cache import CacheError

__all__ = ["StepFeatureMemo"]


class StepFeatureMemo:
    """Named features stored per loop step index (encoder reuse: Faster-Diffusion, DeepCache).

    Keys are the loop's step *index* ``i`` (an int), never the timestep value: two
    steps with the same timestep are two entries. With ``max_steps`` set, storing
    a new step beyond the cap drops the oldest-inserted step. Values are whatever
    the strategy stores (tensors, or a record of them); the memo never copies them.

    Example:
        memo = StepFeatureMemo(max_steps=1)  # only the last full step's features
        memo.put(0, "decoder_inputs", feats)
        feats = memo.latest("decoder_inputs", at_or_before=3)
    """

    def __init__(self, max_steps: int | None = None):
        if max_steps is not None and (
            isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1
        ):
            raise CacheError(f"max_steps must be a positive int or None, got {max_steps!r}.")
        self.max_steps = max_steps
        self._steps: OrderedDict[int, dict[str, Any]] = OrderedDict()  # step -> name -> value

    def put(self, step: int, name: str, value: Any) -> None:
        """Store ``value`` under ``name`` for loop step ``step`` (replacing what was there)."""
        step = _check_memo_step(step)
        if not isinstance(name, str) or not name:
            raise CacheError(f"feature name must be a non-empty str, got {name!r}.")
        if step not in self._steps:
            self._steps[step] = {}
            if self.max_steps is not None:
                while len(self._steps) > self.max_steps:
                    self._steps.popitem(last=False)
        self._steps[step][name] = value

    def latest(self, name: str, at_or_before: int | None = None, default: Any = ...) -> Any:
        """The value of ``name`` at the most recent step ``<= at_or_before`` (any step when None).

        Returns ``default`` when no such step holds ``name``; without a default that is a
        KeyError naming the steps that do hold it.
        """
        if at_or_before is not None:
            at_or_before = _check_memo_step(at_or_before)
        holding = [s for s, features in self._steps.items() if name in features]
        candidates = [s for s in holding if at_or_before is None or s <= at_or_before]
        if not candidates:
            if default is not ...:
                return default
            where = "" if at_or_before is None else f" at or before step {at_or_before}"
            raise KeyError(
                f"no feature {name!r} stored{where}; steps holding it: {sorted(holding) or 'none'}."
            )
        return self._steps[max(candidates)][name]

    def clear(self) -> None:
        """Drop every step's features."""
        self._steps.clear()

    def __len__(self) -> int:
        """The number of steps stored."""
        return len(self._steps)


def _check_memo_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        kind = "a tensor" if isinstance(step, torch.Tensor) else type(step).__name__
        raise CacheError(
            f"StepFeatureMemo is keyed by the loop's step index (int), got {kind} {step!r}; "
            f"pass i from `for i, t in enumerate(timesteps)`, not the timestep t (two steps may "
            f"share a timestep value)."
        )
    return step
