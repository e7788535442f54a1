"""Features stored per loop step index: :class:`StepFeatureMemo`.

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
    """Named tensors stored per loop step index (encoder reuse: Faster-Diffusion, DeepCache).

    Keys are the loop's step *index* ``i`` (an int), never the timestep value: two
    steps with the same timestep are two entries. With ``max_steps`` set, storing
    a new step beyond the cap drops the oldest-inserted step.

    Example:
        memo = StepFeatureMemo(max_steps=2)
        memo.put(0, "down_residuals", feats)
        step, feats = memo.latest("down_residuals", at_or_before=3)
    """

    def __init__(self, max_steps: int | None = None):
        if max_steps is not None and (
            isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1
        ):
            raise CacheError(f"max_steps must be a positive int or None, got {max_steps!r}.")
        self.max_steps = max_steps
        self._steps: OrderedDict[int, dict[str, Any]] = OrderedDict()

    def put(self, step: int, name: str, value: Any) -> None:
        """Store ``value`` (a tensor or any object) under ``name`` for loop step ``step``."""
        step = _check_memo_step(step)
        if not isinstance(name, str) or not name:
            raise CacheError(f"feature name must be a non-empty str, got {name!r}.")
        if step not in self._steps:
            self._steps[step] = {}
            if self.max_steps is not None:
                while len(self._steps) > self.max_steps:
                    self._steps.popitem(last=False)
        self._steps[step][name] = value

    def get(self, step: int, name: str, default: Any = ...) -> Any:
        """The value stored under ``name`` at ``step``; ``default`` if given, else a clear error."""
        step = _check_memo_step(step)
        features = self._steps.get(step)
        if features is None or name not in features:
            if default is not ...:
                return default
            have = sorted(k for k, v in self._steps.items() if name in v)
            raise KeyError(
                f"no feature {name!r} stored at step {step}; steps holding it: {have or 'none'}."
            )
        return features[name]

    def has(self, step: int, name: str) -> bool:
        """Whether ``name`` is stored at ``step``."""
        return name in self._steps.get(_check_memo_step(step), {})

    def latest(self, name: str, at_or_before: int) -> tuple[int, Any]:
        """The most recent ``(step, value)`` of ``name`` with step ``<= at_or_before``.

        Raises KeyError when no such step is stored.
        """
        at_or_before = _check_memo_step(at_or_before)
        candidates = [s for s, feats in self._steps.items() if s <= at_or_before and name in feats]
        if not candidates:
            raise KeyError(f"no feature {name!r} stored at or before step {at_or_before}.")
        step = max(candidates)
        return step, self._steps[step][name]

    def steps(self) -> list[int]:
        """The stored step indices, ascending."""
        return sorted(self._steps)

    def clear(self, step: int | None = None) -> None:
        """Drop one step's features, or everything when ``step`` is None."""
        if step is None:
            self._steps.clear()
        else:
            self._steps.pop(_check_memo_step(step), None)

    def __len__(self) -> int:
        return len(self._steps)

    def __contains__(self, step: object) -> bool:
        return step in self._steps


def _check_memo_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        kind = "a tensor" if isinstance(step, torch.Tensor) else type(step).__name__
        raise CacheError(
            f"StepFeatureMemo is keyed by the loop's step index (int), got {kind} {step!r}; "
            f"pass i from `for i, t in enumerate(timesteps)`, not the timestep t (two steps may "
            f"share a timestep value)."
        )
    return step
