"""PipelineHooks: diffusers hooks and a one-off subclass, restored exactly."""

from __future__ import annotations

import pytest
import torch
from decodekit import compat
from decodekit.diffusers_hooks import PipelineHooks
from decodekit.errors import AttachError
from decodekit.testing import assert_restored, fingerprint
from diffusers.hooks import HookRegistry, ModelHook


class Doubling(ModelHook):
    def new_forward(self, module, *args, **kwargs):
        return 2 * self.fn_ref.original_forward(*args, **kwargs)


class Pipe:
    def __init__(self):
        self.a = torch.nn.Linear(2, 2)
        self.b = torch.nn.Linear(2, 2)

    def __call__(self, x):
        return self.b(self.a(x))


def _state(module):
    return (dict(vars(module)), compat.hook_registry(module))


def test_restore_leaves_modules_and_class_exactly_as_before():
    pipe, x = Pipe(), torch.ones(1, 2)
    base = pipe(x)
    before, state_a, state_b = fingerprint(pipe.a), _state(pipe.a), _state(pipe.b)
    hooks = PipelineHooks(pipe, "test")
    hooks.attach(
        [(pipe.a, Doubling()), (pipe.b, Doubling())],
        {"__call__": lambda self, x: Pipe.__call__(self, x) + 1},
    )
    assert type(pipe) is not Pipe and hooks.original_class is Pipe
    a, b = (
        lambda y, m=m: torch.nn.functional.linear(y, m.weight, m.bias) for m in (pipe.a, pipe.b)
    )
    assert torch.allclose(pipe(x), 2 * b(2 * a(x)) + 1)
    hooks.restore()
    assert type(pipe) is Pipe and hooks.original_class is None
    assert _state(pipe.a) == state_a and _state(pipe.b) == state_b
    assert compat.hook_registry(pipe.a) is None and "forward" not in vars(pipe.a)
    assert_restored(before, fingerprint(pipe.a))
    assert torch.equal(pipe(x), base)


def test_a_registry_that_was_there_stays_with_its_other_hooks():
    pipe, x = Pipe(), torch.ones(1, 2)
    HookRegistry.check_if_exists_or_initialize(pipe.a).register_hook(Doubling(), "theirs")
    theirs = pipe.a(x)
    registry, forward = compat.hook_registry(pipe.a), vars(pipe.a)["forward"]
    hooks = PipelineHooks(pipe, "test")
    hooks.attach([(pipe.a, Doubling())], {})
    assert torch.allclose(pipe.a(x), 2 * theirs)
    hooks.restore()
    assert compat.hook_registry(pipe.a) is registry and list(registry.hooks) == ["theirs"]
    assert vars(pipe.a)["forward"] is forward
    assert torch.equal(pipe.a(x), theirs)


def test_a_module_hooked_by_another_run_is_refused_with_nothing_changed():
    pipe = Pipe()
    first = PipelineHooks(pipe, "test")
    first.attach([(pipe.b, Doubling())], {})
    before = fingerprint(pipe.a)
    second = PipelineHooks(Pipe(), "test")
    second.pipe.a, second.pipe.b = pipe.a, pipe.b
    with pytest.raises(AttachError, match="already carries a 'test' hook"):
        second.attach([(pipe.a, Doubling()), (pipe.b, Doubling())], {})
    assert_restored(before, fingerprint(pipe.a))
    assert not second.attached
    first.restore()
    assert compat.hook_registry(pipe.b) is None
