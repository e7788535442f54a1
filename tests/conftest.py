"""Shared fixtures: a fresh plugin manager, and throwaway plugins registered for one test."""

from __future__ import annotations

import os

import decodekit.manager as manager_mod
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
