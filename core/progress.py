"""Progress bars of ``bench``, ``demo`` and ``run``: a labelled line on stderr with an ETA.

The label says what runs now (``sjd.yaml · strategy · pair 3/8``, ``shapes.yaml ·
prompt 2/8``). The ETA counts only measured items: warm-up runs are shown but
never timed into the rate (`Eta`), so a slow first call does not inflate it.
A bar is drawn only on a terminal unless asked for (``enabled=True``), and is
erased when it closes, so the printed results stay as they were.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


class Eta:
    """Time left from the items measured so far, per kind of item (an arm, ``prompt``).

    ``remaining`` says how many measured items of each kind are still to come;
    `record` counts one done with its duration. Items not recorded (warm-up)
    never enter the rate. Each kind left is estimated by its own mean, or by
    the mean over all kinds until it has one of its own; None until any item
    was measured.
    """

    def __init__(self, remaining: dict[str, int]):
        self.remaining = dict(remaining)
        self.times: dict[str, list[float]] = {k: [] for k in remaining}

    def record(self, kind: str, seconds: float) -> None:
        """One measured ``kind`` item took ``seconds``."""
        self.times.setdefault(kind, []).append(seconds)
        self.remaining[kind] = self.remaining.get(kind, 0) - 1

    def seconds(self) -> float | None:
        """The time left, or None while nothing was measured and something is left."""
        left = {k: n for k, n in self.remaining.items() if n > 0}
        if not left:
            return 0.0
        every = [t for ts in self.times.values() for t in ts]
        if not every:
            return None
        overall = statistics.fmean(every)
        return sum(
            n * (statistics.fmean(self.times[k]) if self.times.get(k) else overall)
            for k, n in left.items()
        )


def format_eta(seconds: float | None) -> str:
    """``ETA 1:05``, ``ETA 2:03:04``; ``ETA after warm-up`` when unknown."""
    if seconds is None:
        return "ETA after warm-up"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"ETA {h}:{m:02d}:{s:02d}" if h else f"ETA {m}:{s:02d}"


def bench_label(config: str, arm: str, index: int, count: int, warmup: bool = False) -> str:
    """``sjd.yaml · strategy · pair 3/8`` (``warm-up 1/2`` for warm-up runs)."""
    return f"{config} · {arm} · {'warm-up' if warmup else 'pair'} {index}/{count}"


def prompt_label(config: str, first: int, last: int, count: int) -> str:
    """``shapes.yaml · prompt 3/8``, or ``prompts 3-4/8`` for a batch (1-based)."""
    if first == last:
        return f"{config} · prompt {first}/{count}"
    return f"{config} · prompts {first}-{last}/{count}"


class Bar:
    """One progress line on ``stream``: label, done/total, a bar and the ETA.

    Args:
        total: items in all.
        enabled: draw it (None: only when ``stream`` is a terminal).
        stream: where it goes (default: ``sys.stderr``).
        width: characters of the bar itself.
    """

    def __init__(
        self, total: int, enabled: bool | None = None, stream: TextIO | None = None, width: int = 20
    ):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.width = width
        self.done = 0
        self.label = ""
        self.eta: float | None = None
        self._shown = 0

    def line(self) -> str:
        """The text of the line as it would be drawn now."""
        filled = self.width * self.done // max(1, self.total)
        full, empty = ("█", "·") if self._unicode() else ("#", "-")
        bar = full * filled + empty * (self.width - filled)
        return f"{self.label}  {bar} {self.done}/{self.total}  {format_eta(self.eta)}"

    def _unicode(self) -> bool:
        """Whether the stream's encoding can write the block characters (not cp1252, ascii)."""
        try:
            "█·".encode(getattr(self.stream, "encoding", None) or "utf-8")
        except (LookupError, UnicodeEncodeError):
            return False
        return True

    def show(self, label: str | None = None, eta: float | None | bool = False) -> None:
        """Redraw, with a new ``label`` and ``eta`` (seconds or None) where given."""
        if label is not None:
            self.label = label
        if eta is not False:
            self.eta = eta
        if not self.enabled:
            return
        text = self.line()
        self.stream.write("\r" + text + " " * max(0, self._shown - len(text)))
        self.stream.flush()
        self._shown = len(text)

    def advance(self, n: int = 1, eta: float | None | bool = False) -> None:
        """``n`` more items are done."""
        self.done += n
        self.show(eta=eta)

    def close(self) -> None:
        """Erase the line (the results printed after it stay clean)."""
        if self.enabled and self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()
        self._shown = 0

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prompt_batches(inputs: Any, size: int | None = None) -> list[Any]:
    """``inputs`` split into copies of ``size`` prompts (default ``inputs.batch_size``).

    Without a size, or with one prompt, the inputs stay whole: one pipeline call
    for all prompts, as the adapter makes it. A list input as long as the prompt
    list (``negative_prompt``) is split with it; every other input is kept. Row
    seeds come from each prompt's own text (`decodekit.seeds`), so each row's
    seed does not depend on the split.
    """
    prompts = getattr(inputs, "prompt", None)
    size = size or getattr(inputs, "batch_size", None)
    if not isinstance(prompts, list) or not size or size >= len(prompts):
        return [inputs]
    along = [
        name
        for name, value in inputs
        if name != "prompt" and isinstance(value, list) and len(value) == len(prompts)
    ]
    batches = []
    for first in range(0, len(prompts), size):
        update = {"prompt": prompts[first : first + size]}
        update.update({name: getattr(inputs, name)[first : first + size] for name in along})
        batches.append(inputs.model_copy(update=update))
    return batches


def generate_with_progress(
    adapter: Any,
    target: Any,
    inputs: Any,
    label: str,
    enabled: bool | None = None,
    batch_size: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
    stream: TextIO | None = None,
) -> Any:
    """``adapter.generate`` over `prompt_batches`, with a bar over prompts and its ETA.

    With one batch the adapter draws its own bar (diffusers' steps) where it has
    one; with several, the bar over prompts replaces it. The first batch is
    left out of the rate once a later one was timed (it carries the one-time
    costs of a first call). Outputs are joined in prompt order.
    """
    batches = prompt_batches(inputs, batch_size)
    if len(batches) == 1:
        if enabled is None:
            enabled = bool((stream or sys.stderr).isatty())
        return adapter.generate(target, inputs, progress=enabled)
    count = len(inputs.prompt)
    per_prompt: list[float] = []  # seconds per prompt of each batch
    parts: list[Any] = []
    first = 1
    with Bar(count, enabled, stream) as bar:
        for batch in batches:
            n = len(batch.prompt)
            bar.show(prompt_label(label, first, first + n - 1, count))
            t0 = clock()
            parts.append(adapter.generate(target, batch, progress=False))
            per_prompt.append((clock() - t0) / n)
            first += n
            rate = statistics.fmean(per_prompt[1:] or per_prompt)
            bar.advance(n, eta=rate * (count - first + 1))
    return _joined(parts)


def _joined(parts: list[Any]) -> Any:
    """The batches' outputs as one: lists concatenated, tensors joined along rows."""
    if all(isinstance(p, (list, tuple)) for p in parts):
        return [row for p in parts for row in p]
    import torch

    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    raise TypeError(
        f"cannot join per-prompt outputs of type {type(parts[0]).__name__}; "
        "the adapter's generate should return a list or a tensor"
    )


__all__ = [
    "Eta",
    "Bar",
    "format_eta",
    "bench_label",
    "prompt_label",
    "prompt_batches",
    "generate_with_progress",
]
