"""Injected faults leave the pipeline exactly as before attach (issue 22, "Pipelines left modified").

Each test breaks one step of a run — a strategy's ``on_attach``, ``on_detach``,
``reset``, ``decodekit_call_start`` or ``decodekit_call_end``, the adapter's
restore, a clash inside a built-in — and checks three outcomes: the error
names every failure, the pipeline's fingerprint equals the one taken before
attach, and the next plain call gives the baseline output.
"""

from __future__ import annotations

import decodekit
import pytest
import torch
from decodekit.hookspecs import hookimpl
from decodekit.strategy import Strategy
from decodekit.testing import assert_restored, fingerprint, run_sd, tiny_llama, tiny_sd_pipeline

PROMPTS = ["a red circle", "a blue square"]
STEPS = 4


@pytest.fixture(scope="module")
def sd():
    pipe = tiny_sd_pipeline()
    base = run_sd(pipe, PROMPTS, steps=STEPS)  # a call sets the pipeline's per-call attributes
    return pipe, fingerprint(pipe), base


def fd() -> dict:
    # Key steps 0 and 3 of 4: steps 1-2 are served from the cache, so its UNet hooks matter.
    return {"name": "faster-diffusion", "params": {"key_steps": [0, 3]}}


def assert_plain(sd) -> None:
    pipe, before, base = sd
    assert decodekit.session.attached_run(pipe) is None
    assert_restored(before, fingerprint(pipe))
    assert torch.equal(run_sd(pipe, PROMPTS, steps=STEPS), base)


class Recorder(Strategy):
    """Records its lifecycle into a shared list; optionally raises at one point."""

    loops = ("continuous-denoising", "token-autoregression")

    def __init__(self, name: str, log: list[str], fail: str | None = None):
        super().__init__()
        self.name = name  # instance attribute: several recorders in one run
        self.log, self.fail = log, fail

    def _at(self, where: str) -> None:
        self.log.append(f"{self.name}.{where}")
        if self.fail == where:
            raise RuntimeError(f"{self.name} broke in {where}")

    def on_attach(self, run) -> None:
        self._at("on_attach")

    def on_detach(self, run) -> None:
        self._at("on_detach")

    def reset(self, run) -> None:
        self._at("reset")

    @hookimpl
    def decodekit_call_start(self, run, call_kwargs):
        self._at("call_start")

    @hookimpl
    def decodekit_call_end(self, run, output):
        self._at("call_end")


# -- attach is all or nothing ---------------------------------------------------------------
def test_on_attach_failure_after_a_unet_hooking_strategy_restores_everything(sd):
    pipe = sd[0]
    log: list[str] = []
    with pytest.raises(RuntimeError, match="boom broke in on_attach"):
        decodekit.attach(pipe, [fd(), Recorder("a", log), Recorder("boom", log, fail="on_attach")])
    # The ones attached before it are undone in reverse; the failing one cleans up itself.
    assert log == ["a.on_attach", "boom.on_attach", "a.on_detach"]
    assert_plain(sd)


def test_on_attach_failure_reports_a_failing_undo_too(sd):
    pipe = sd[0]
    log: list[str] = []
    with pytest.raises(RuntimeError, match="boom broke in on_attach") as e:
        decodekit.attach(
            pipe, [fd(), Recorder("a", log, fail="on_detach"), Recorder("boom", log, "on_attach")]
        )
    assert any(
        "strategy 'a' on_detach" in n and "a broke in on_detach" in n for n in e.value.__notes__
    )
    assert_plain(sd)


# -- detach always completes --------------------------------------------------------------------
def test_failing_on_detach_still_detaches_the_rest_and_names_the_failure(sd):
    pipe = sd[0]
    log: list[str] = []
    cache = decodekit.session.build_strategies([fd()], decodekit.get_manager())[0]
    run = decodekit.attach(pipe, [cache, Recorder("a", log, fail="on_detach"), Recorder("b", log)])
    run_sd(pipe, PROMPTS, steps=STEPS)
    with pytest.raises(decodekit.DetachError, match="strategy 'a' on_detach") as e:
        run.detach()
    assert [who for who, _ in e.value.failures] == ["strategy 'a' on_detach"]
    assert isinstance(e.value.__cause__, RuntimeError)
    assert log[-2:] == ["b.on_detach", "a.on_detach"]
    assert cache.run is None and not cache._handles  # faster-diffusion's on_detach ran after a's
    assert not run.attached
    run.detach()  # idempotent: nothing left to fail
    assert_plain(sd)


def test_every_detach_failure_is_reported(sd, monkeypatch):
    pipe = sd[0]
    log: list[str] = []
    run = decodekit.attach(
        pipe, [Recorder("a", log, fail="on_detach"), Recorder("b", log, fail="on_detach")]
    )
    real_detach = run._adapter.detach

    def detach_then_fail():
        real_detach()
        raise OSError("adapter restore broke")

    monkeypatch.setattr(run._adapter, "detach", detach_then_fail)
    with pytest.raises(decodekit.DetachError) as e:
        run.detach()
    assert [who for who, _ in e.value.failures] == [
        "strategy 'b' on_detach",
        "strategy 'a' on_detach",
        "pipeline adapter 'stable-diffusion' detach",
    ]
    msg = str(e.value)
    assert "b broke in on_detach" in msg and "a broke in on_detach" in msg
    assert "adapter restore broke" in msg
    assert_plain(sd)


# -- every hook call sits inside the guard ------------------------------------------------------
@pytest.mark.parametrize("where", ["reset", "call_start", "call_end"])
def test_failure_in_a_call_hook_detaches_and_reraises(sd, where):
    pipe = sd[0]
    log: list[str] = []
    run = decodekit.attach(pipe, [fd(), Recorder("a", log), Recorder("bad", log, fail=where)])
    with pytest.raises(RuntimeError, match=f"bad broke in {where}"):
        run_sd(pipe, PROMPTS, steps=STEPS)
    assert not run.attached and not run.in_call
    assert log[-2:] == ["bad.on_detach", "a.on_detach"]
    assert_plain(sd)


def test_failure_in_call_hook_with_failing_detach_notes_both(sd):
    pipe = sd[0]
    run = decodekit.attach(pipe, [Recorder("bad", [], fail="call_start")])

    def also_fail(run):
        raise RuntimeError("on_detach broke too")

    run.strategies[0].on_detach = also_fail
    with pytest.raises(RuntimeError, match="bad broke in call_start") as e:
        run_sd(pipe, PROMPTS, steps=STEPS)
    assert any("on_detach broke too" in n for n in e.value.__notes__)
    assert not run.attached
    assert_plain(sd)


def test_diverse_beam_clash_with_generate_args_leaves_the_model_plain():
    model = tiny_llama(dtype=torch.float64)
    before = fingerprint(model)
    prompt = torch.tensor([[1, 5, 6, 7]])
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    base = model.generate(prompt, **kw)
    run = decodekit.attach(
        model,
        [{"name": "diverse-beam", "params": {"num_beam_groups": 2, "num_beams": 4}}],
    )
    with pytest.raises(decodekit.ConfigError, match="num_beams"):
        model.generate(prompt, num_beams=6, **kw)
    assert not run.attached
    assert_restored(before, fingerprint(model))
    assert torch.equal(model.generate(prompt, **kw), base)  # plain greedy, not beam search


# -- a strategy instance belongs to one run -------------------------------------------------------
def test_strategy_instance_cannot_join_two_live_runs(sd):
    pipe = sd[0]
    other = tiny_sd_pipeline(seed=1)
    other_before = fingerprint(other)
    shared = decodekit.session.build_strategies([fd()], decodekit.get_manager())[0]
    with decodekit.attach(pipe, [shared]):
        with pytest.raises(decodekit.AttachError, match="'faster-diffusion'.*new instance"):
            decodekit.attach(other, [shared])
        assert_restored(other_before, fingerprint(other))
        assert shared.run is decodekit.session.attached_run(pipe)
    with decodekit.attach(other, [shared]) as run:  # free again after detach
        assert shared.run is run
    assert_restored(other_before, fingerprint(other))
    assert_plain(sd)
