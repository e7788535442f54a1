"""The runtime surface as documented: which torch hooks fire on a served UNet call; run.stats scopes."""

from __future__ import annotations

import decodekit
import torch
from decodekit import Strategy, hookimpl
from decodekit.testing import run_sd, tiny_sd_pipeline


class CountingServe(Strategy):
    """Serves every odd step with the previous step's output, counting what it served in the call."""

    name = "counting-serve"
    loops = ("continuous-denoising",)
    slot = "denoiser-cache"

    def reset(self, run):
        self.prev = None
        self.n_served = 0

    @hookimpl
    def decodekit_denoiser_forward(self, run, step, role, args, kwargs):
        if role == "denoiser" and step % 2 == 1 and self.prev is not None:
            self.n_served += 1
            return self.prev

    @hookimpl
    def decodekit_denoiser_output(self, run, step, role, output):
        if role == "denoiser":
            self.prev = output

    def stats(self):
        return {"served_by_me": self.n_served}


def test_served_unet_call_fires_torch_forward_pre_hooks_and_forward_hooks():
    pipe = tiny_sd_pipeline()
    pre, post = [], []
    h1 = pipe.unet.register_forward_pre_hook(lambda m, a: pre.append(1))
    h2 = pipe.unet.register_forward_hook(lambda m, a, o: post.append(1))
    try:
        with decodekit.attach(pipe, [CountingServe()]) as run:
            run_sd(pipe, ["a", "b"], steps=6)
            assert run.served > 0 and run.nfe + run.served == 6
        # Every UNet call, served or computed, goes through torch's Module.__call__: hooks fire 6 times.
        assert len(pre) == 6 and len(post) == 6
    finally:
        h1.remove()
        h2.remove()


def test_run_stats_scope_whole_run_top_level_last_call_below():
    pipe = tiny_sd_pipeline()
    with decodekit.attach(pipe, [CountingServe()]) as run:
        run_sd(pipe, ["a"], steps=6)
        first = run.stats
        run_sd(pipe, ["a"], steps=6)
        s = run.stats
    assert s["calls"] == 2 and s["nfe"] + s["served"] == 12  # whole run
    assert s["nfe"] == 2 * first["nfe"] and s["time_s"] >= s["last_call"]["time_s"]
    last = s["last_call"]
    assert last["nfe"] + last["served"] == 6  # last call only
    per = last["strategies"]["counting-serve"]
    assert per["served_by_me"] == last["served"] == first["last_call"]["served"]
    assert s["strategies"] is not None and s["strategies"] == last["strategies"]
    assert s["hook_time_s"]["counting-serve"] >= per["hook_time_s"]
    assert run.last == {k: v for k, v in last.items() if k != "strategies"}


class CountingServeTotals(CountingServe):
    """CountingServe that declares its counter, with a derived figure over the run."""

    name = "counting-serve-totals"
    counters = ("served_by_me", "not_reported")

    def total_stats(self, totals):
        return {"served_per_call": totals["served_by_me"] / self.run.calls}


def test_run_totals_sum_the_declared_counters_over_calls():
    pipe = tiny_sd_pipeline()
    with decodekit.attach(pipe, [CountingServeTotals(), _Noop()]) as run:
        run_sd(pipe, ["a"], steps=6)
        assert run.stats["totals"]["counting-serve-totals"]["served_by_me"] == 3
        run_sd(pipe, ["a"], steps=4)
        s = run.stats
    last = s["last_call"]["strategies"]["counting-serve-totals"]["served_by_me"]
    assert last == 2  # the last call alone
    # the declared counter summed over both calls (a key stats() lacks is left out), the
    # derived figure beside it; a strategy that declares no counters has no totals
    assert s["totals"] == {"counting-serve-totals": {"served_by_me": 5, "served_per_call": 2.5}}


class _Noop(Strategy):
    name = "noop-surface"
    loops = ("continuous-denoising",)


def test_run_attributes_documented_exist():
    pipe = tiny_sd_pipeline()
    with decodekit.attach(pipe, [_Noop()]) as run:
        for attr in ("target", "strategies", "loop", "adapter", "attached", "in_call", "calls"):
            getattr(run, attr)
        for attr in ("nfe", "served", "time_s", "last", "stats"):
            getattr(run, attr)
        assert run.loop == "continuous-denoising" and run.adapter.denoiser is pipe.unet
    doc = decodekit.Run.__doc__
    for attr in ("target", "strategies", "loop", "adapter", "calls", "nfe", "served", "time_s"):
        assert f"{attr}:" in doc


def test_llada2_model_pre_hooks_fire_for_served_calls_and_for_the_strategys_own_forward():
    from decodekit.testing import tiny_llada2_pipeline

    from tests.tiny import run_llada2

    pipe = tiny_llada2_pipeline()
    pre = []
    h = pipe.model.register_forward_pre_hook(lambda m, a: pre.append(1))
    try:
        with decodekit.attach(pipe, ["dkv-cache"]) as run:
            run_llada2(pipe)
            nfe, served = run.nfe, run.served
    finally:
        h.remove()
    # run.nfe counts every model call of the loop here, served ones included; a served call
    # fires the hook once for the pipeline's call and once for dkv-cache's own partial forward.
    assert served > 0 and len(pre) == nfe + served


def test_causal_lm_forward_pre_hooks_of_others_fire_every_forward():
    from decodekit.testing import tiny_llama

    model = tiny_llama()
    pre = []
    h = model.register_forward_pre_hook(lambda m, a: pre.append(1))
    try:
        with decodekit.attach(model, []) as run:
            model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
            assert len(pre) == run.nfe == run.last["nfe"] and run.served == 0
    finally:
        h.remove()
