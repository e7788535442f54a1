"""Packaging: a built wheel holds the three packages and the entry points, and imports on its own."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_SOURCES = (".git", ".venv", "build", "dist", ".site", "outputs", "*.egg-info", "__pycache__",
               ".pytest_cache", ".hypothesis", ".ruff_cache")  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of the source tree: setuptools stages the packages (the zoo's
    # model files included) in a build/ folder beside pyproject.toml, which would
    # otherwise stay in the checkout as a second copy of the zoo.
    source = tmp_path_factory.mktemp("source") / "decodekit"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("decodekit-*.whl")
    return whl


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for must in (
        "decodekit/__init__.py",
        "decodekit/session.py",
        "decodekit/plugins/prior_noise.py",
        "decodekit/pipelines/stable_diffusion.py",
        "decodekit/pipelines/zoo/__init__.py",
    ):
        assert must in names, f"{must} missing from the wheel"
    assert not any(n.startswith(("core/", "plugins/", "pipelines/", "tests/")) for n in names)
    (ep,) = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(ep).decode()
    assert "[decodekit]" in text and "decodekit.plugins.prior_noise" in text
    assert "decodekit = decodekit.cli:main" in text


def test_wheel_imports_and_registers_builtins(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = (
        "import decodekit, decodekit.plugins, decodekit.pipelines;"
        "m = decodekit.get_manager();"
        "print(decodekit.__file__);"
        "print(sorted(m.registry.pipelines), sorted(m.registry.strategies))"
    )
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    first, second = out.stdout.strip().splitlines()
    assert first.startswith(str(tmp_path)), f"imported {first}, not the wheel"
    assert "'causal-lm'" in second and "'stable-diffusion'" in second and "'prior-noise'" in second
