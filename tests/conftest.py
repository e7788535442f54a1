"""Shared fixtures: a fresh plugin manager, throwaway plugins registered for one test, the toy plugin."""

from __future__ import annotations

import os
from pathlib import Path

import decodekit.manager as manager_mod
import pytest
import torch

from tests.tiny import make_toy_plugin

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny tensors, where a second thread only waits (seconds
    per call on a busy machine); the count is restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def manager(monkeypatch):
    """The global plugin manager, loaded fresh for this test and forgotten after it."""
    monkeypatch.delenv("DECODEKIT_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("DECODEKIT_DISABLE_PLUGINS", raising=False)
    manager_mod.reset_manager()
    try:
        yield manager_mod.get_manager()
    finally:
        manager_mod.reset_manager()


@pytest.fixture
def register_plugin(manager):
    """Register a throwaway plugin (module-like object) for one test; unregistered in `finally`."""
    names: list[str] = []

    def register(plugin, name: str | None = None) -> str:
        n = manager.register(plugin, name=name)
        names.append(n)
        return n

    try:
        yield register
    finally:
        for n in names:
            if manager.pm.has_plugin(n):
                manager.unregister(n)


@pytest.fixture
def toy(register_plugin, tmp_path) -> Path:
    """Register the toy plugin; returns an (empty) model folder for it."""
    register_plugin(make_toy_plugin(), name="toy-plugin")
    model_dir = tmp_path / "toy-model"
    model_dir.mkdir()
    return model_dir
