"""Process settings of the ``decodekit`` command: torch's CPU threads and library chatter.

`set_threads` picks torch's intra-op threads for a run. On a CPU the default is
**one thread per process**: the zoo's models and most decoding loops make many
small model calls, and on the shared 2-core development machine a 2-prompt,
50-step zoo:shapes-sd run took 13-16 s with torch's default (2 threads) against
0.63 s with one (docs/cli.md, "Threads"). ``--threads N`` or the config's
``pipeline.threads`` choose otherwise; a GPU run keeps torch's default unless
one of them is given.

`quiet_libraries` keeps transformers' and diffusers' logging, progress bars and
warnings out of the terminal while a command runs (``--verbose`` lets them through).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

CPU_DEFAULT_THREADS = 1
"""torch intra-op threads of a CPU run when neither ``--threads`` nor ``pipeline.threads`` says."""

# Warnings raised from inside these libraries are library chatter to the user of the CLI.
_LIBRARY_MODULES = r"(diffusers|transformers|huggingface_hub|accelerate|torch)(\..*)?$"


def set_threads(device: str, threads: int | None = None) -> int:
    """Set torch's intra-op threads for a run on ``device``; return the number in use.

    ``threads`` (from ``--threads`` or ``pipeline.threads``) wins; otherwise a CPU
    run uses `CPU_DEFAULT_THREADS` and any other device keeps torch's setting.
    """
    import torch

    if threads is None and device == "cpu":
        threads = CPU_DEFAULT_THREADS
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@contextlib.contextmanager
def quiet_libraries(quiet: bool = True) -> Iterator[None]:
    """Silence transformers/diffusers logging, progress bars and library warnings inside the block.

    Errors are still logged. Everything is restored on exit, so a program that
    calls ``decodekit.cli.main`` keeps its own settings. ``quiet=False`` does nothing.
    """
    if not quiet:
        yield
        return
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (tlog, dlog)]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=_LIBRARY_MODULES)
            for lib, _, _ in saved:
                lib.set_verbosity_error()
                lib.disable_progress_bar()
            yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            (lib.enable_progress_bar if bars else lib.disable_progress_bar)()


def configure_threads(config: Any, threads: int | None = None) -> int:
    """`set_threads` for a loaded `RunConfig`: ``threads`` (``--threads``), else ``pipeline.threads``."""
    from .errors import ConfigError

    if threads is not None and threads < 1:
        raise ConfigError("--threads", f"must be at least 1, got {threads}")
    chosen = threads if threads is not None else config.pipeline.threads
    return set_threads(config.device, chosen)


@contextlib.contextmanager
def kept_threads() -> Iterator[None]:
    """Restore torch's intra-op thread count on exit (a command sets it for its own run only)."""
    import torch

    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)
