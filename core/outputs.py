"""Output folders and files that are never left half-written or mixed with another run's.

`decodekit run` checks its output folder before the model loads
(`prepare_output_dir`), writes every file through a temporary file in the same
folder that is renamed over the final name once complete (`atomic_write_bytes`,
`atomic_write_text`, `atomic_save_image`), and records what it wrote in
``run.json`` (`write_run_record`). A file is therefore either absent or
complete, also when the run is interrupted (Ctrl-C) or the disk fills up.

A non-empty output folder is refused unless ``overwrite`` is set. With
``overwrite``, the files the previous run recorded in its ``run.json`` are
removed, together with that ``run.json`` and any temporary file an earlier
crash left behind; files decodekit did not record are kept (decodekit never
deletes a file it did not write). A rerun of the same config in its folder
resumes instead (`decodekit.distributed.Job`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import ConfigError

__all__ = [
    "PARTS",
    "RUN_RECORD",
    "TEMP_MARK",
    "atomic_save_image",
    "atomic_write_bytes",
    "atomic_write_text",
    "image_names",
    "output_records",
    "prepare_output_dir",
    "save_outputs",
    "slug",
    "write_run_record",
]

RUN_RECORD = "run.json"
"""The file beside the outputs that records the run (config, versions, stats, files written)."""

TEMP_MARK = ".decodekit-tmp-"
"""Part of every temporary file's name; such files are removed on error and by ``--overwrite``."""

PARTS = ".decodekit-parts"
"""The folder of a run's saved batches whose outputs share one file, until they are joined."""


def prepare_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Create ``path``, check it is writable and empty; with ``overwrite``, clear the previous run.

    Raises `ConfigError` (key ``output.dir``) when the folder cannot be created
    or written, or is not empty and ``overwrite`` is false. With ``overwrite``
    it removes the files recorded in the folder's ``run.json``, ``run.json``
    itself and leftover temporary files, and keeps every other file.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError("output.dir", f"{str(out)!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("output.dir", f"cannot create {str(out)!r}: {_reason(e)}") from None
    if overwrite:
        _clear_previous_run(out)
    else:
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            raise ConfigError(
                "output.dir",
                f"{str(out)!r} is not empty ({listed(entries)}); pass --overwrite to replace the previous "
                "run's outputs, or choose an empty or new folder",
            )
    try:  # a probe, so that a read-only folder fails now and not after generation
        fd, probe = tempfile.mkstemp(prefix=TEMP_MARK + "probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError("output.dir", f"cannot write to {str(out)!r}: {_reason(e)}") from None
    return out


def _clear_previous_run(out: Path) -> None:
    """Remove what the previous decodekit run in ``out`` recorded, and stale temporary files."""
    record = out / RUN_RECORD
    names: list[str] = []
    if record.is_file():
        try:
            previous = json.loads(record.read_text(encoding="utf-8"))
            # a run killed before its last record lists what it planned to write
            names = list(previous.get("files", [])) + list(previous.get("planned", []))
        except (OSError, ValueError, AttributeError, TypeError) as e:
            raise ConfigError(
                "output.dir",
                f"cannot read {str(record)!r} to clear the previous run ({e}); "
                "remove the folder's outputs yourself or choose another folder",
            ) from None
    names += [p.name for p in out.iterdir() if TEMP_MARK in p.name]
    for name in names:
        p = out / str(name)
        # only plain files directly inside the folder: a record never reaches outside it
        if p.parent == out and p.is_file() and not p.is_symlink():
            p.unlink()
    parts = out / PARTS
    if parts.is_dir() and not parts.is_symlink():
        shutil.rmtree(parts)
    if record.is_file():
        record.unlink()


def listed(names: list[str], most: int = 5) -> str:
    """``a, b, c and 4 more``: the first ``most`` names and how many others."""
    extra = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + extra


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


@contextmanager
def _atomic(path: str | os.PathLike, mode: str, **kw: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``."""
    final = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}{TEMP_MARK}", dir=final.parent)
    try:
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:  # KeyboardInterrupt included: no temporary file is left behind
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that ``path`` is either its old self or complete."""
    with _atomic(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_image(image: Any, path: str | os.PathLike, format: str = "PNG") -> Path:
    """Save a PIL image to ``path`` atomically (PNG unless ``format`` says otherwise)."""
    with _atomic(path, "wb") as f:
        image.save(f, format=format)
        _saving_hook()
    return Path(path)


def _saving_hook() -> None:
    """Tests only: ``DECODEKIT_TEST_SLOW_SAVE=<seconds>`` makes each image save that slow."""
    delay = os.environ.get("DECODEKIT_TEST_SLOW_SAVE")
    if delay:
        import time

        time.sleep(float(delay))


def slug(text: str, max_len: int = 40) -> str:
    """A file-name-safe slug of ``text``: lowercase ASCII ``[a-z0-9-]``, at most ``max_len`` chars.

    Accents are dropped (``"Crème"`` -> ``"creme"``), every other run of characters
    becomes one ``-``, and a long slug is cut at the last ``-`` that fits (or at
    ``max_len`` when a single word is longer). It may be empty (a prompt of
    punctuation or of non-Latin script only).
    """
    import re
    import unicodedata

    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    s = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    if len(s) > max_len:
        cut = s[: max_len + 1].rfind("-")
        s = s[:cut] if cut > 0 else s[:max_len]
    return s.strip("-")


def image_names(prompts: list[str], per_prompt: int = 1, ext: str = "png") -> list[str]:
    """File names of the images of ``prompts``, prompt-major (the order pipelines return them).

    ``000-a-red-circle.png`` for prompt 0 (index, then `slug` of the prompt); with
    ``per_prompt > 1`` each image of a prompt adds its number: ``000-a-red-circle-0.png``,
    ``000-a-red-circle-1.png``. A prompt whose slug is empty gives ``000.png``.
    """
    names = []
    for i, prompt in enumerate(prompts):
        stem = f"{i:03d}" + (f"-{s}" if (s := slug(prompt)) else "")
        names += (
            [f"{stem}.{ext}"]
            if per_prompt == 1
            else [f"{stem}-{k}.{ext}" for k in range(per_prompt)]
        )
    return names


def save_outputs(adapter: Any, outputs: Any, out_dir: Path, inputs: Any) -> list[Path]:
    """``adapter.save(outputs, out_dir, inputs=inputs)``; an adapter whose ``save`` takes no
    ``inputs`` (written before it existed) is called without them."""
    import inspect

    params = inspect.signature(adapter.save).parameters
    if "inputs" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return list(adapter.save(outputs, out_dir, inputs=inputs) or [])
    return list(adapter.save(outputs, out_dir) or [])


def output_records(adapter: Any, outputs: Any, inputs: Any, out_dir: Path) -> list[dict[str, Any]]:
    """The adapter's per-output rows for ``run.json`` (file, prompt, seed ...), for files present.

    An interrupted run lists only the outputs whose file was written; an adapter
    without ``records`` gives none.
    """
    records = getattr(adapter, "records", None)
    if records is None:
        return []
    try:
        rows = list(records(outputs, inputs))
    except Exception:  # the record of the run is written anyway, without its per-output rows
        return []
    return [r for r in rows if (Path(out_dir) / str(r.get("file", ""))).is_file()]


def write_run_record(out_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write ``record`` as ``run.json`` in ``out_dir`` (atomically); returns its path."""
    from .bench import jsonable

    text = json.dumps(jsonable(record), indent=2) + "\n"
    return atomic_write_text(Path(out_dir) / RUN_RECORD, text)
