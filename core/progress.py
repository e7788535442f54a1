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
from typing import TextIO


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


__all__ = [
    "Eta",
    "Bar",
    "format_eta",
    "bench_label",
    "prompt_label",
]
