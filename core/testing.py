"""Test helpers every strategy's tests reuse, third-party plugins' included.

`CommitRecorder` records a masked-diffusion run's steps without changing them.
`StrategyTesterMixin` checks the contract of attach/detach on a concrete
pipeline: exact restore, refusing a second attach, per-call state reset, seed
determinism, batch invariance, and detach on an exception. A test class mixes
it in and says how to build the pipeline and run it.

Tiny pipelines to run it on, built from configs with nothing to download
(`tiny_sd_pipeline`, `tiny_llama`, `tiny_mdm_pipeline` ... from
`decodekit.tiny_models`), are importable from here.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import decodekit
import torch
from decodekit.hookspecs import hookimpl
from decodekit.strategy import Strategy
from decodekit.tiny_models import (  # noqa: F401  (re-exported for plugin tests)
    MASK,
    VOCAB,
    run_dit,
    run_sd,
    sd_latents,
    tiny_bidirectional_llama,
    tiny_controlnet_pipeline,
    tiny_flux_pipeline,
    tiny_llada2_pipeline,
    tiny_llama,
    tiny_llava,
    tiny_llava_processor,
    tiny_mdm_pipeline,
    tiny_pixart_pipeline,
    tiny_sana_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_img2img_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
    tiny_t5,
    tiny_text_encoder,
    tiny_unet,
    tiny_vae,
)
from torch.overrides import TorchFunctionMode


def _modules_of(obj: Any) -> dict[str, torch.nn.Module]:
    if isinstance(obj, torch.nn.Module):
        return dict(obj.named_modules())
    mods: dict[str, torch.nn.Module] = {}
    components = getattr(obj, "components", None)
    if isinstance(components, dict):
        for name, comp in components.items():
            if isinstance(comp, torch.nn.Module):
                for sub, m in comp.named_modules():
                    mods[f"{name}.{sub}"] = m
    model = getattr(obj, "model", None)
    if isinstance(model, torch.nn.Module):
        for sub, m in model.named_modules():
            mods[f"model.{sub}"] = m
    return mods


def fingerprint(obj: Any) -> dict[str, Any]:
    """What attach may touch, recorded so that a detach can be checked against it.

    The class, the instance attributes, and for every submodule its instance
    attributes (a hook leaves ``forward``/``_diffusers_hook`` behind), its
    torch hook dicts, and the identity of its parameters.
    """
    fp: dict[str, Any] = {
        "class": type(obj),
        "dict": {k: id(v) for k, v in vars(obj).items()} if hasattr(obj, "__dict__") else {},
    }
    for name, m in _modules_of(obj).items():
        fp[name] = {
            "class": type(m),
            "dict": sorted(k for k in vars(m) if not k.startswith("_buffers") and k != "training"),
            "forward": m.__dict__.get("forward"),
            "generate": m.__dict__.get("generate"),
            "hooks": tuple(
                len(getattr(m, h))
                for h in (
                    "_forward_hooks",
                    "_forward_pre_hooks",
                    "_forward_hooks_with_kwargs",
                    "_forward_pre_hooks_with_kwargs",
                )
            ),
            "params": tuple(id(p) for p in m.parameters(recurse=False)),
        }
    return fp


def assert_restored(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Fail with the first difference between two fingerprints."""
    assert before.keys() == after.keys(), f"submodules changed: {set(before) ^ set(after)}"
    for k in before:
        assert before[k] == after[k], f"{k or 'object'} not restored: {before[k]!r} != {after[k]!r}"


class StrategyTesterMixin:
    """Contract tests for one strategy on one pipeline; subclasses fill in the four hooks below.

    A pytest class mixes it in (``class TestMine(StrategyTesterMixin): ...``) and
    defines:

    - ``strategies`` (class attribute): what to attach.
    - ``make_pipeline(self)``: a fresh pipeline or model, e.g. `tiny_sd_pipeline`.
    - ``run_pipeline(self, pipe, inputs, seed, row_offset=0)``: one call on a batch
      of ``inputs``, returning a tensor with one row per input, row ``i`` seeded by
      ``seed`` and ``row_offset + i`` only (`sd_latents` does this for SD).
    - ``sample_inputs(self)``: two or more different inputs.
    - ``broken_call(self, pipe)``: a call that raises inside generation (a step
      callback that raises, a bad argument the model rejects mid-loop).

    Optional: ``atol`` and ``attach(self, pipe)`` (to attach differently). The
    tests then check: exact restore on detach, a second attach refused, per-call
    state reset (same output, ``nfe``/``served`` and strategy ``stats()`` on two
    identical calls), seed determinism, batch invariance, detach on an exception.

    Attributes:
        strategies: what to pass to `decodekit.attach` (names, dicts or instances).
        atol: tolerance of the batch-invariance check (0 for exact strategies).
    """

    strategies: list[Any] = []
    atol: float = 1e-5

    def make_pipeline(self) -> Any:
        """A fresh pipeline or model (tiny, random weights are fine)."""
        raise NotImplementedError

    def run_pipeline(
        self, pipe: Any, inputs: list[Any], seed: int, row_offset: int = 0
    ) -> torch.Tensor:
        """Run the pipeline on a batch of ``inputs`` with ``seed``; one output row per input, as a tensor.

        Row ``i``'s random draws (initial noise, sampling) must depend on ``seed``
        and ``row_offset + i`` only, not on the batch, so that a batch equals its rows run alone.
        """
        raise NotImplementedError

    def sample_inputs(self) -> list[Any]:
        """Two or more different inputs (prompts ...) for the batch checks."""
        raise NotImplementedError

    def broken_call(self, pipe: Any) -> None:
        """Call the pipeline so that it raises inside generation."""
        raise NotImplementedError

    def attach(self, pipe: Any):
        return decodekit.attach(pipe, self.strategies)

    # -- the contract ----------------------------------------------------------------
    def test_detach_restores(self):
        pipe = self.make_pipeline()
        inputs = self.sample_inputs()[:1]
        base = self.run_pipeline(pipe, inputs, seed=0)
        before = fingerprint(pipe)
        with self.attach(pipe) as run:
            self.run_pipeline(pipe, inputs, seed=0)
            assert run.attached
        assert not run.attached
        assert_restored(before, fingerprint(pipe))
        assert torch.equal(self.run_pipeline(pipe, inputs, seed=0), base)

    def test_attach_twice_raises(self):
        pipe = self.make_pipeline()
        with self.attach(pipe):
            try:
                decodekit.attach(pipe, self.strategies)
            except decodekit.AttachError as e:
                assert "already" in str(e)
            else:
                raise AssertionError("a second attach to the same pipeline was accepted")

    def test_state_reset_between_calls(self):
        pipe = self.make_pipeline()
        inputs = self.sample_inputs()[:1]
        with self.attach(pipe) as run:
            first = self.run_pipeline(pipe, inputs, seed=0)
            stats_first = dict(run.last)
            second = self.run_pipeline(pipe, inputs, seed=0)
            assert (
                run.last["nfe"] == stats_first["nfe"]
                and run.last["served"] == stats_first["served"]
            )
        torch.testing.assert_close(first, second, rtol=0, atol=0)

    def test_strategy_stats_reset_between_calls(self):
        """Each strategy's own ``stats()`` describes one call: two identical calls report the same.

        Figures in seconds (keys ending in ``_s``) are left out.
        """
        pipe = self.make_pipeline()
        inputs = self.sample_inputs()[:1]
        with self.attach(pipe) as run:
            self.run_pipeline(pipe, inputs, seed=0)
            first = {s.name: _untimed(s.stats()) for s in run.strategies}
            self.run_pipeline(pipe, inputs, seed=0)
            second = {s.name: _untimed(s.stats()) for s in run.strategies}
        for name in first:
            assert _same(first[name], second[name]), (
                f"{name}: stats() differ between two identical calls ({first[name]!r} then "
                f"{second[name]!r}); reset per-call counters in reset() or decodekit_call_start"
            )

    def test_seed_deterministic(self):
        pipe = self.make_pipeline()
        inputs = self.sample_inputs()[:1]
        with self.attach(pipe):
            a = self.run_pipeline(pipe, inputs, seed=3)
        with self.attach(pipe):
            b = self.run_pipeline(pipe, inputs, seed=3)
        assert torch.equal(a, b)

    def test_batch_invariant(self):
        pipe = self.make_pipeline()
        inputs = self.sample_inputs()
        with self.attach(pipe):
            batch = self.run_pipeline(pipe, inputs, seed=0)
            alone = torch.cat(
                [self.run_pipeline(pipe, [x], seed=0, row_offset=i) for i, x in enumerate(inputs)]
            )
        torch.testing.assert_close(batch, alone, rtol=0, atol=self.atol)

    def test_exception_detaches(self):
        pipe = self.make_pipeline()
        before = fingerprint(pipe)
        run = self.attach(pipe)
        try:
            self.broken_call(pipe)
        except Exception:
            pass
        else:
            raise AssertionError("broken_call did not raise")
        assert not run.attached
        assert_restored(before, fingerprint(pipe))


def _untimed(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if not k.endswith("_s")}


def _same(a: Any, b: Any) -> bool:
    """Equality that also compares tensors (exactly) inside dicts, lists and tuples."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


class HostReads(TorchFunctionMode):
    """Count the tensor operations that read values back to the host.

    On a GPU each of them (``bool(t)``, ``int(t)``, ``t.item()``, ``t.tolist()``,
    ``t.nonzero()``, ``t.cpu()``...) waits until the device has finished all work
    queued so far, so a strategy that reads once per layer serialises the model's
    forward. Writing a Python number through integer index tensors
    (``t[rows, cols] = 0``) counts too: on CUDA the number is copied from the host
    and that copy waits as well (write a device tensor, e.g. ``torch.full((), 0,
    device=t.device)``, with ``index_put_``). The count is taken on any device, so
    CPU tests can check that a strategy's reads per step do not grow with the
    number of layers::

        with HostReads() as reads:
            pipe(...)
        reads.total  # operations that read back
        reads.counts  # by name
    """

    NAMES = frozenset(
        {
            "__bool__",
            "__int__",
            "__index__",
            "__float__",
            "item",
            "tolist",
            "nonzero",
            "cpu",
            "numpy",
        }
    )

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            self.counts[name] += 1
        elif name == "__setitem__" and _scalar_index_put(args):
            self.counts["__setitem__(index, number)"] += 1
        return func(*args, **(kwargs or {}))


def _scalar_index_put(args) -> bool:
    """``t[index_tensor] = <python number>``: on CUDA the number becomes a host tensor that
    ``index_put_`` copies to the device, and that copy waits for the device."""
    if len(args) < 3 or not isinstance(args[2], (bool, int, float)):
        return False
    key = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(
        isinstance(k, torch.Tensor)
        and k.dim() > 0
        and not k.dtype.is_floating_point
        and k.dtype != torch.bool
        for k in key
    )


class CommitRecorder(Strategy):
    """A masked-diffusion strategy that changes nothing and records every step: ``steps`` is
    a list of ``(step, x, committed)``, the sequence after the step's commits ``(B, L)``
    and which positions it committed ``(B, L)`` bool. Reset at every call."""

    name = "commit-recorder"
    loops = ("masked-diffusion",)

    def reset(self, run) -> None:
        self.steps: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    @hookimpl
    def decodekit_mdm_committed(self, run, step, x, committed):
        self.steps.append((step, x.clone(), committed.clone()))


# -- distribution oracles (exact samplers: SJD, speculative decoding) -------------------------
def enumerate_joint(next_probs, vocab: int, length: int) -> torch.Tensor:
    """The exact joint distribution of ``length`` tokens drawn one after another, ``(vocab**length,)``.

    ``next_probs(prefixes)`` takes every prefix of one length, long ``(M, t)``
    (``t = 0 .. length - 1``), and returns the distribution of the next token
    after each, ``(M, vocab)``. Sequence ``(x_0, ..., x_{n-1})`` is at flat index
    ``sum_i x_i * vocab**(n - 1 - i)`` (row-major, as `sequence_index` computes).
    The probabilities are multiplied in float64.
    """
    joint = torch.ones(1, dtype=torch.float64)  # (vocab**t,)
    prefixes = torch.zeros(1, 0, dtype=torch.long)  # (vocab**t, t)
    for _ in range(length):
        probs = next_probs(prefixes).to(torch.float64).cpu()  # (M, vocab)
        if probs.shape != (prefixes.shape[0], vocab):
            raise ValueError(
                f"next_probs returned {tuple(probs.shape)} for {prefixes.shape[0]} prefixes; "
                f"expected ({prefixes.shape[0]}, {vocab})."
            )
        joint = (joint[:, None] * probs).reshape(-1)  # (vocab**(t+1),)
        nxt = torch.arange(vocab).repeat(prefixes.shape[0])[:, None]
        prefixes = torch.cat([prefixes.repeat_interleave(vocab, dim=0), nxt], dim=1)
    return joint


def sequence_index(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """Flat index of each sequence ``(S, n)`` in `enumerate_joint`'s order, ``(S,)``."""
    weights = vocab ** torch.arange(tokens.shape[-1] - 1, -1, -1, device=tokens.device)
    return (tokens.long() * weights).sum(dim=-1)


def chi_square_pvalue(
    samples: torch.Tensor, probs: torch.Tensor, vocab: int, min_expected: float = 5.0
) -> float:
    """Pearson's chi-square goodness-of-fit p-value of sampled sequences against ``probs``.

    ``samples`` ``(S, n)`` token sequences, ``probs`` their exact joint distribution
    ``(vocab**n,)`` (`enumerate_joint`). Cells expected fewer than ``min_expected``
    times are pooled into one cell (dropped when it is still expected less than
    that); degrees of freedom = cells − 1. A sample in a cell of probability 0 gives
    p = 0. The p-value is the regularised upper incomplete gamma function.
    """
    probs = probs.to(torch.float64).cpu()
    counts = torch.bincount(sequence_index(samples.cpu(), vocab), minlength=probs.numel()).to(
        torch.float64
    )  # (vocab**n,)
    if counts.numel() > probs.numel():
        raise ValueError("samples hold tokens outside the vocabulary")
    if bool((counts[probs == 0] > 0).any()):
        return 0.0
    expected = probs / probs.sum() * counts.sum()
    big = expected >= min_expected
    obs = [counts[big]]
    exp = [expected[big]]
    pooled_e = expected[~big].sum()
    if pooled_e >= min_expected:
        obs.append(counts[~big].sum()[None])
        exp.append(pooled_e[None])
    o, e = torch.cat(obs), torch.cat(exp)
    if o.numel() < 2:
        raise ValueError("too few samples for a chi-square test: fewer than two usable cells")
    stat = ((o - e) ** 2 / e).sum()
    dof = torch.tensor((o.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, stat / 2))


def ks_statistic(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov statistic ``sup |F_n(x) - F(x)|`` of 1-D ``samples`` against ``cdf``.

    ``cdf`` maps a float64 tensor of points to their cumulative probabilities.
    """
    x = samples.detach().to(torch.float64).flatten().sort().values  # (n,)
    n = x.numel()
    if n == 0:
        raise ValueError("ks_statistic needs at least one sample")
    f = cdf(x).to(torch.float64)  # (n,)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n - f
    lower = f - torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(upper, lower).max())


def ks_two_sample_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic ``sup |F_a(x) - F_b(x)|`` of 1-D samples."""
    a = a.detach().to(torch.float64).flatten().sort().values
    b = b.detach().to(torch.float64).flatten().sort().values
    points = torch.cat([a, b])
    fa = torch.searchsorted(a, points, right=True).to(torch.float64) / a.numel()
    fb = torch.searchsorted(b, points, right=True).to(torch.float64) / b.numel()
    return float((fa - fb).abs().max())


def ks_pvalue(statistic: float, n: int, m: int | None = None) -> float:
    """p-value of a Kolmogorov-Smirnov statistic from ``n`` samples (or ``n`` and ``m``: two-sample).

    The asymptotic Kolmogorov distribution ``Q(l) = 2 sum_k (-1)^(k-1) exp(-2 k^2 l^2)``
    at ``l = (sqrt(e) + 0.12 + 0.11 / sqrt(e)) D`` with ``e = n`` or ``n m / (n + m)``
    (Stephens' small-sample correction; accurate to a few per cent of p for e >= 20).
    """
    e = float(n) if m is None else n * m / (n + m)
    lam = (math.sqrt(e) + 0.12 + 0.11 / math.sqrt(e)) * statistic
    if lam < 0.2:
        return 1.0
    total = sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return float(min(1.0, max(0.0, 2 * total)))
