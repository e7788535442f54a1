"""Per-row seeds that follow a prompt, not its place in the list.

A YAML run (``decodekit run``, ``bench``, the demo) samples each output row
from its own random generator, seeded from ``inputs.seed``, the prompt's text,
its occurrence among identical prompts of the list (0 for the first ``"a"``, 1
for the second ...) and the row's number among that prompt's images or samples.
So the same prompt draws the same random numbers in any list, at any position
and beside any batch mates (its output is the same sample, up to the float
rounding a batch's shape can change); a repeated prompt still gets a different
sample each time. The hash is SHA-256 (stable across processes and machines, unlike
Python's ``hash``), cut to 63 bits.

A slice of a longer list (one batch, one process's shard) is seeded as in the
whole list under `earlier_copies`, which counts the copies of each prompt ahead
of the slice.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch

__all__ = ["earlier_copies", "row_generators", "row_seed", "row_seeds"]

_EARLIER: ContextVar[dict[str, int] | None] = ContextVar("decodekit_earlier_copies", default=None)


@contextmanager
def earlier_copies(prompts_before: Sequence) -> Iterator[None]:
    """Seed a slice of a prompt list as in the whole list: ``prompts_before`` are those ahead of it.

    Inside the block, `row_seeds` counts each prompt's occurrences from its
    copies in ``prompts_before``, so a repeated prompt's second copy keeps its
    own seed when it lands in another batch or process than the first. Class
    ids count under their label ``"class N"`` too, as ar-image seeds them.
    """
    counts: Counter[str] = Counter()
    for p in prompts_before:
        counts[p if isinstance(p, str) else str(p)] += 1
        if not isinstance(p, str):
            counts[f"class {p}"] += 1
    token = _EARLIER.set(dict(counts))
    try:
        yield
    finally:
        _EARLIER.reset(token)


def row_seed(seed: int, prompt: str, occurrence: int = 0, k: int = 0) -> int:
    """The seed of row ``k`` of the ``occurrence``-th copy of ``prompt`` in a run seeded ``seed``."""
    key = f"decodekit-row-seed\0{seed}\0{occurrence}\0{k}\0".encode() + prompt.encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1  # 63 bits


def row_seeds(seed: int, prompts: Sequence[str], per_prompt: int = 1) -> list[int]:
    """One seed per output row, prompt-major: ``per_prompt`` rows for each prompt in order."""
    seen = dict(_EARLIER.get() or {})  # copies ahead of this slice (`earlier_copies`), else none
    seeds = []
    for prompt in prompts:
        occurrence = seen.get(prompt, 0)
        seen[prompt] = occurrence + 1
        seeds += [row_seed(seed, prompt, occurrence, k) for k in range(per_prompt)]
    return seeds


def row_generators(
    seed: int, prompts: Sequence[str], per_prompt: int = 1, device: str = "cpu"
) -> list[torch.Generator]:
    """`row_seeds` as seeded ``torch.Generator`` objects (one per output row)."""
    return [torch.Generator(device).manual_seed(s) for s in row_seeds(seed, prompts, per_prompt)]
