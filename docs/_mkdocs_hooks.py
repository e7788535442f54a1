"""mkdocs hook: keep the console-script folder off griffe's search path.

``.venv/bin/mkdocs`` runs with ``.venv/bin`` as ``sys.path[0]``, and that folder
holds the ``decodekit`` console script. griffe (mkdocstrings' loader) takes a
file named like the package for the package itself and then finds no
``decodekit.kv_cache``. Without that folder griffe falls back to importing
``decodekit`` and reads the source files the import names (``core/...``), which
also works for the editable install's package-dir mapping.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.plugins import event_priority


@event_priority(100)  # before mkdocstrings sets up its handler from sys.path
def on_config(config):
    script_dir = Path(sys.argv[0]).resolve().parent if sys.argv and sys.argv[0] else None
    if script_dir is not None and (script_dir / "decodekit").is_file():
        sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != script_dir]
    return config
