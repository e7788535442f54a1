"""The errors decodekit raises for bad input: each says what was wrong and how to fix it."""

from __future__ import annotations


class DecodekitError(Exception):
    """Base class of every error decodekit raises on purpose."""


class ConfigError(DecodekitError, ValueError):
    """A configuration value is wrong; `path` names the key (``strategies.0.params.key_steps``)."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class CompositionError(DecodekitError):
    """A set of strategies cannot run together; the message names both sides and the fix."""


class AttachError(DecodekitError):
    """An object cannot be attached to (unknown kind, already attached, unsupported model)."""


class UnknownNameError(ConfigError):
    """A strategy, pipeline or zoo name that is not registered; suggests close matches."""

    def __init__(self, path: str, kind: str, name: str, known: list[str]):
        import difflib

        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(sorted(known)) or "none"
        super().__init__(path, f"unknown {kind} {name!r}.{hint} Known: {listing}.")
        self.name = name
        self.suggestions = close


class DetachError(DecodekitError):
    """Detaching finished, but some strategies' ``on_detach`` or the adapter's restore raised.

    Every hook was still called and the adapter restore was still run; `failures`
    lists each ``(who, exception)`` in the order they happened, and the first
    exception is chained as ``__cause__``.
    """

    def __init__(self, failures: list[tuple[str, BaseException]]):
        self.failures = list(failures)
        lines = "; ".join(f"{who}: {type(e).__name__}: {e}" for who, e in self.failures)
        super().__init__(
            f"detach completed, but {len(self.failures)} step(s) failed: {lines}. "
            "The other hooks were removed; report the failing plugin to its authors."
        )
