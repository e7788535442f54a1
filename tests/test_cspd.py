"""Continuous speculative decoding (arXiv:2411.11925): the acceptance rules and the `cspd` strategy.

The rules (decodekit.continuous_speculative) are tested against closed-form
targets: Kolmogorov-Smirnov and moments on 1-D and 16-D Gaussians, a Gaussian
mixture, a two-token chain whose second token depends on the first, and a
diffusion-head-like Gaussian chain with a deterministic last step. Each test
runs a negative control through the same statistic (accepting every draft) and
checks that it fails.
"""

from __future__ import annotations

import math

import pytest
import torch
from decodekit.continuous_speculative import (
    LastStepGaussian,
    diagonal_gaussian_log_prob,
    exact_verify,
    paper_log_acceptance_ratio,
    paper_verify,
    speculative_cut,
)
from decodekit.testing import ks_pvalue, ks_statistic, ks_two_sample_statistic


@pytest.fixture(autouse=True)
def one_thread():
    """Many small tensor ops: one thread is faster than two on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ALPHA = 1e-3  # a correct sampler fails a fixed-seed test with this probability
M = 20_000  # samples per test: KS detects a CDF shift of about 0.014


def normal_cdf(mean: float, std: float):
    return lambda x: 0.5 * (1 + torch.erf((x - mean) / (std * math.sqrt(2))))


class DiagGaussian:
    """One diagonal Gaussian per position: ``mean``, ``std`` ``(N, D)`` (a `TokenDensity`)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean, std

    def sample(self, index, generator):
        mean, std = self.mean[index], self.std[index]
        if isinstance(generator, list):  # one per position
            noise = [torch.randn(mean.shape[1:], generator=g, dtype=mean.dtype) for g in generator]
            return mean + std * torch.stack(noise) if noise else mean.clone()
        return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)

    def log_prob(self, x, index):
        return diagonal_gaussian_log_prob(x, self.mean[index], self.std[index])


class Mixture1D:
    """The same two-component 1-D Gaussian mixture at every one of ``n`` positions."""

    def __init__(self, n, weights, means, stds):
        self.n = n
        self.w = torch.tensor(weights, dtype=torch.float64)
        self.mu = torch.tensor(means, dtype=torch.float64)
        self.sd = torch.tensor(stds, dtype=torch.float64)

    def sample(self, index, generator):
        k = torch.multinomial(self.w, index.numel(), replacement=True, generator=generator)
        z = torch.randn(index.numel(), generator=generator, dtype=torch.float64)
        return (self.mu[k] + self.sd[k] * z)[:, None]  # (M, 1)

    def log_prob(self, x, index):
        z = (x - self.mu) / self.sd  # (M, K)
        comp = -0.5 * z * z - self.sd.log() - 0.5 * math.log(2 * math.pi) + self.w.log()
        return torch.logsumexp(comp, dim=-1)

    def cdf(self, x):
        c = 0.5 * (1 + torch.erf((x[:, None] - self.mu) / (self.sd * math.sqrt(2))))
        return (c * self.w).sum(-1)


def same_everywhere(mean, std, n=M, dim=1):
    """A `DiagGaussian` with the same ``mean``/``std`` (floats or (D,)) at ``n`` positions."""
    mean = torch.as_tensor(mean, dtype=torch.float64).expand(dim).clone()
    std = torch.as_tensor(std, dtype=torch.float64).expand(dim).clone()
    return DiagGaussian(mean.expand(n, dim), std.expand(n, dim))


def draft_and_verify(draft, target, seed, **kwargs):
    g = torch.Generator().manual_seed(seed)
    x = draft.sample(torch.arange(M), g)
    return x, exact_verify(x, draft, target, g, independent=True, **kwargs)


def assert_moments(x, mean, var):
    """Sample mean and variance within 5 standard errors of ``mean``/``var`` (per coordinate)."""
    n = x.shape[0]
    se_mean = (var / n) ** 0.5
    se_var = var * (2 / (n - 1)) ** 0.5
    assert torch.all((x.mean(0) - mean).abs() < 5 * se_mean), (x.mean(0), mean)
    assert torch.all((x.var(0) - var).abs() < 5 * se_var), (x.var(0), var)


# -- the exact rule ----------------------------------------------------------------------------
@pytest.mark.parametrize("first_round", [1, 4])
def test_exact_1d_gaussian_reproduces_target_and_accept_all_does_not(first_round):
    q, p = same_everywhere(0.7, 1.3), same_everywhere(0.0, 1.0)
    x, v = draft_and_verify(q, p, seed=1, first_round=first_round)
    out = v.samples[:, 0]
    assert ks_pvalue(ks_statistic(out, normal_cdf(0, 1)), M) > ALPHA
    assert_moments(v.samples, torch.zeros(1), torch.ones(1))
    rate = v.accepted.double().mean().item()
    assert 0.5 < rate < 0.9  # some of both: the test exercises the residual
    assert not v.failed.any() and not v.dropped.any()
    assert torch.equal(v.samples[v.accepted], x[v.accepted])  # kept drafts unchanged
    # negative control: the drafts themselves, through the same statistic
    assert ks_pvalue(ks_statistic(x[:, 0], normal_cdf(0, 1)), M) < 1e-12


def test_exact_16d_gaussian_reproduces_target():
    D = 16
    gen = torch.Generator().manual_seed(5)
    mu_p = torch.randn(D, generator=gen, dtype=torch.float64)
    sd_p = 0.5 + torch.rand(D, generator=gen, dtype=torch.float64)
    mu_q = mu_p + 0.12 * torch.randn(D, generator=gen, dtype=torch.float64)
    sd_q = sd_p * 1.08
    p, q = same_everywhere(mu_p, sd_p, dim=D), same_everywhere(mu_q, sd_q, dim=D)
    x, v = draft_and_verify(q, p, seed=2)
    # squared Mahalanobis distance under p is chi-square with 16 degrees of freedom
    chi2_cdf = lambda r: torch.special.gammainc(torch.tensor(D / 2.0, dtype=r.dtype), r / 2)  # noqa: E731
    r_out = (((v.samples - mu_p) / sd_p) ** 2).sum(-1)
    r_draft = (((x - mu_p) / sd_p) ** 2).sum(-1)
    assert ks_pvalue(ks_statistic(r_out, chi2_cdf), M) > ALPHA
    for d in (0, 7, 15):  # a few marginals
        assert ks_pvalue(ks_statistic(v.samples[:, d], normal_cdf(mu_p[d], sd_p[d])), M) > ALPHA
    assert_moments(v.samples, mu_p, sd_p**2)
    assert 0.2 < v.accepted.double().mean().item() < 0.9
    # negative control
    assert ks_pvalue(ks_statistic(r_draft, chi2_cdf), M) < 1e-6


def test_exact_gaussian_mixture_target_from_one_gaussian_draft():
    p = Mixture1D(M, [0.3, 0.7], [-1.5, 1.2], [0.5, 0.7])
    q = same_everywhere(0.0, 1.6)
    x, v = draft_and_verify(q, p, seed=3)
    assert ks_pvalue(ks_statistic(v.samples[:, 0], p.cdf), M) > ALPHA
    mean = float((p.w * p.mu).sum())
    var = float((p.w * (p.sd**2 + p.mu**2)).sum()) - mean**2
    assert_moments(v.samples, torch.tensor([mean]), torch.tensor([var]))
    assert ks_pvalue(ks_statistic(x[:, 0], p.cdf), M) < 1e-12  # negative control


@pytest.mark.parametrize("first_round", [1, 4])
def test_exact_has_no_cap_on_tries_and_no_zero_samples(first_round):
    # draft and target 0.05 apart: a rejected position needs about 1/TV = 50 proposals
    q, p = same_everywhere(0.05, 1.0), same_everywhere(0.0, 1.0)
    x, v = draft_and_verify(q, p, seed=4, first_round=first_round)
    assert v.resampled.sum() > 100
    assert int(v.tries.max()) > 100  # the reference would have given up (zeros) here
    assert not (v.samples[v.resampled] == 0).all(-1).any()
    assert ks_pvalue(ks_statistic(v.samples[:, 0], normal_cdf(0, 1)), M) > ALPHA
    # E[tries] per verified position is TV / TV = 1
    assert abs(v.tries.double().mean().item() - 1.0) < 0.2
    # max_tries is a guard that raises, never a cap that returns a sample
    g = torch.Generator().manual_seed(4)
    with pytest.raises(RuntimeError, match="refused"):
        exact_verify(x, q, p, g, independent=True, max_tries=3)
    with pytest.raises(ValueError, match="first_round must be in"):
        exact_verify(x, q, p, g, independent=True, first_round=0)


def test_exact_same_densities_accept_everything_and_draw_nothing_more():
    p = same_everywhere(0.3, 0.9)
    x, v = draft_and_verify(p, p, seed=6)
    assert v.accepted.all() and torch.equal(v.samples, x) and int(v.tries.sum()) == 0


def test_exact_per_row_generators_make_a_row_independent_of_the_others():
    # rows verified together, each drawing from its own generator, give each row what it
    # gets alone; the residual proposals of all rows are evaluated in one call
    q, p = same_everywhere(0.6, 1.2, n=40), same_everywhere(0.0, 1.0, n=40)
    x = q.sample(torch.arange(40), torch.Generator().manual_seed(0))
    rows = torch.arange(4).repeat_interleave(10)
    together = exact_verify(
        x, q, p, [torch.Generator().manual_seed(s) for s in range(4)], rows=rows, independent=True
    )
    assert together.resampled.any() and together.accepted.any()
    for r in range(4):
        at = rows == r
        q_r = DiagGaussian(q.mean[at], q.std[at])
        p_r = DiagGaussian(p.mean[at], p.std[at])
        g = [torch.Generator().manual_seed(r)]
        alone = exact_verify(
            x[at], q_r, p_r, g, rows=torch.zeros(10, dtype=torch.long), independent=True
        )
        assert torch.equal(alone.samples, together.samples[at])
        assert torch.equal(alone.tries, together.tries[at])
    with pytest.raises(ValueError, match="rows"):
        exact_verify(x, q, p, [torch.Generator()] * 4, independent=True)


def test_speculative_cut_keeps_groups_before_the_first_rejection():
    passes = torch.tensor([True, True, False, True, False, True, True])
    order = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    kept, resample, dropped = speculative_cut(passes, order)
    assert kept.tolist() == [True, True, False, True, False, False, False]
    assert resample.tolist() == [False, False, True, False, False, False, False]
    assert dropped.tolist() == [False, False, False, False, True, True, True]
    rows = torch.tensor([0, 0, 0, 0, 1, 1, 1])  # cut per row
    kept, resample, dropped = speculative_cut(passes, order, rows)
    assert kept.tolist() == [True, True, False, True, False, True, False]
    assert resample.tolist() == [False, False, True, False, True, False, False]
    assert dropped.tolist() == [False, False, False, False, False, False, True]
    kept, resample, dropped = speculative_cut(torch.ones(3, dtype=torch.bool), None)
    assert kept.all() and not resample.any() and not dropped.any()


def chain_statistics(independent: bool, seed: int):
    """Two tokens per sequence: target x1 ~ N(0, 1), x2 | x1 ~ N(0.8 x1, 0.6^2); draft differs.

    Runs speculative rounds until every sequence is complete and returns the
    target's standardised innovation ``(x2 - 0.8 x1) / 0.6`` and ``x1``, both N(0, 1)
    under the target.
    """
    n = M
    g = torch.Generator().manual_seed(seed)
    p_mean = lambda x1: 0.8 * x1  # noqa: E731
    q_mean = lambda x1: 0.4 * x1 + 0.3  # noqa: E731
    x1 = 0.4 + 1.2 * torch.randn(n, generator=g, dtype=torch.float64)
    x2 = q_mean(x1) + 0.8 * torch.randn(n, generator=g, dtype=torch.float64)
    samples = torch.stack([x1, x2], 1).reshape(2 * n, 1)  # (2n, 1), sequence-major
    q = DiagGaussian(
        torch.stack([torch.full_like(x1, 0.4), q_mean(x1)], 1).reshape(2 * n, 1),
        torch.tensor([1.2, 0.8], dtype=torch.float64).repeat(n)[:, None],
    )
    p = DiagGaussian(
        torch.stack([torch.zeros_like(x1), p_mean(x1)], 1).reshape(2 * n, 1),
        torch.tensor([1.0, 0.6], dtype=torch.float64).repeat(n)[:, None],
    )
    order = torch.tensor([0, 1]).repeat(n)
    rows = torch.arange(n).repeat_interleave(2)
    v = exact_verify(samples, q, p, g, order=order, rows=rows, independent=independent)
    out = v.samples.reshape(n, 2).clone()
    redo = v.dropped.reshape(n, 2)[:, 1]  # second token dropped: draft it again given the new x1
    if redo.any():
        o1 = out[redo, 0]
        q2 = DiagGaussian(q_mean(o1)[:, None], torch.full_like(o1, 0.8)[:, None])
        p2 = DiagGaussian(p_mean(o1)[:, None], torch.full_like(o1, 0.6)[:, None])
        y = q2.sample(torch.arange(o1.numel()), g)
        v2 = exact_verify(y, q2, p2, g, rows=torch.arange(o1.numel()))  # one token per sequence
        assert not v2.dropped.any()
        out[redo, 1] = v2.samples[:, 0]
    assert bool(redo.any()) != independent
    return (out[:, 1] - 0.8 * out[:, 0]) / 0.6, out[:, 0]


def test_exact_prefix_rule_reproduces_a_dependent_chain():
    innovation, x1 = chain_statistics(independent=False, seed=7)
    assert ks_pvalue(ks_statistic(innovation, normal_cdf(0, 1)), M) > ALPHA
    assert ks_pvalue(ks_statistic(x1, normal_cdf(0, 1)), M) > ALPHA


def test_independent_acceptance_biases_a_dependent_chain():
    # the reference judges each token on its own: the second token was verified against
    # p(x2 | drafted x1) and is kept even where x1 was replaced
    innovation, x1 = chain_statistics(independent=True, seed=7)
    assert ks_pvalue(ks_statistic(x1, normal_cdf(0, 1)), M) > ALPHA  # the first token is fine
    assert ks_pvalue(ks_statistic(innovation, normal_cdf(0, 1)), M) < 1e-6


# -- the reference's rule ----------------------------------------------------------------------
def last_step(mean, std, log_std_sum=0.0, n=M, dim=1):
    full = lambda v: torch.as_tensor(v, dtype=torch.float64).expand(n, dim).clone()  # noqa: E731
    return LastStepGaussian(full(mean), full(std), full(log_std_sum))


def test_paper_ratio_is_the_reference_formula():
    # judge_accept = p~(x) F prod(sq) / (q~(x) prod(sp)), p~/q~ flattened by 42 (linear space)
    g = torch.Generator().manual_seed(0)
    D, n = 16, 5
    r = lambda: torch.rand(n, D, generator=g, dtype=torch.float64)  # noqa: E731
    q = LastStepGaussian(r(), 0.5 + r(), r())
    p = LastStepGaussian(r(), 0.5 + r(), r())
    x = r()
    T = 42.0
    p_un = torch.exp(-0.5 * (((x - p.mean) / p.std / T) ** 2).sum(-1))
    q_un = torch.exp(-0.5 * (((x - q.mean) / q.std / T) ** 2).sum(-1))
    fixed = torch.exp((p.log_std_sum - q.log_std_sum).sum(-1))
    reference = p_un * fixed * q.std.prod(-1) / (q_un * p.std.prod(-1))
    torch.testing.assert_close(paper_log_acceptance_ratio(x, q, p).exp(), reference)


def test_paper_flattening_biases_a_1d_gaussian():
    # q = N(0.7, 1.3), p = N(0, 1): the exact ratio rejects ~30%, the flattened one
    # (1.3 * exp(~0)) accepts nearly all, so the output is close to the draft
    g = torch.Generator().manual_seed(8)
    x = 0.7 + 1.3 * torch.randn(M, 1, generator=g, dtype=torch.float64)
    q, p = last_step(0.7, 1.3), last_step(0.0, 1.0)
    v = paper_verify(x, q, p, g)
    d_paper = ks_statistic(v.samples[:, 0], normal_cdf(0, 1))
    assert v.accepted.double().mean() > 0.99
    assert ks_pvalue(d_paper, M) < 1e-12
    # without the flattening, with these true one-step densities and a residual this
    # wide, the same rule is exact up to its cap (never reached here)
    v1 = paper_verify(x, q, p, g, flatten=1.0)
    assert not v1.failed.any()
    assert ks_pvalue(ks_statistic(v1.samples[:, 0], normal_cdf(0, 1)), M) > ALPHA


def test_paper_cap_leaves_zero_tokens():
    # a residual of small mass: after 100 refused proposals the reference leaves zeros
    g = torch.Generator().manual_seed(9)
    x = 0.05 + torch.randn(M, 1, generator=g, dtype=torch.float64)
    v = paper_verify(x, last_step(0.05, 1.0), last_step(0.0, 1.0), g, flatten=1.0)
    assert v.failed.any()
    assert (v.samples[v.failed] == 0).all()
    assert int(v.tries.max()) == 100


class HeadChain:
    """A diffusion-head-like sampler of ``dim``-D tokens, the same at every one of ``n`` positions.

    As DDPM in MAR's head: ``x_T ~ N(0, I)``; ``x_i = a tanh(x_{i+1}) + b + sigma_i eps_i``
    for ``i = T-1 .. 1``; the token is the last step's mean ``a tanh(x_1) + b`` with no
    noise (the last step's std ``sigma_0`` is recorded, never used). A `TokenDensity`
    over trajectories ``(x_T, .., x_1)``, ``(n, T, dim)``: a product of Gaussians.
    """

    def __init__(self, a, b, sigmas, sigma0, n=M, dim=4):
        self.a, self.b = a, b
        self.sigmas = list(sigmas)  # sigma_{T-1} .. sigma_1
        self.sigma0, self.n, self.dim = sigma0, n, dim

    def mean(self, x):
        return self.a * torch.tanh(x) + self.b

    def run(self, noise):
        """The trajectory ``(n, T, dim)`` for standard noise ``(n, T, dim)`` (share it to share noise)."""
        xs = [noise[:, 0]]
        for i, sigma in enumerate(self.sigmas):
            xs.append(self.mean(xs[-1]) + sigma * noise[:, i + 1])
        return torch.stack(xs, 1)

    def token(self, traj):
        return self.mean(traj[:, -1])

    def noise(self, n, generator):
        T = len(self.sigmas) + 1
        return torch.randn(n, T, self.dim, generator=generator, dtype=torch.float64)

    def sample(self, index, generator):
        return self.run(self.noise(index.numel(), generator))

    def log_prob(self, traj, index):
        x = traj[:, 0]
        lp = diagonal_gaussian_log_prob(x, torch.zeros_like(x), torch.ones_like(x))
        for i, sigma in enumerate(self.sigmas):
            mean = self.mean(traj[:, i])
            lp = lp + diagonal_gaussian_log_prob(traj[:, i + 1], mean, torch.full_like(mean, sigma))
        return lp

    def last_step(self, traj):
        """What the reference records of a run: the last step's Gaussian and the summed log-stds."""
        tok = self.token(traj)
        log_std_sum = sum(math.log(s) for s in self.sigmas)
        return LastStepGaussian(
            tok, torch.full_like(tok, self.sigma0), torch.full_like(tok, log_std_sum)
        )


TARGET_HEAD = dict(a=1.1, b=0.3, sigmas=[0.6, 0.35], sigma0=0.1)
DRAFT_HEAD = dict(a=0.8, b=0.15, sigmas=[0.65, 0.4], sigma0=0.12)


def head_outputs(seed):
    """Tokens of the target head alone, and of draft + verification by the exact and paper rules."""
    g = torch.Generator().manual_seed(seed)
    p, q = HeadChain(**TARGET_HEAD), HeadChain(**DRAFT_HEAD)
    alone = p.token(p.sample(torch.arange(M), g))
    noise = q.noise(M, g)  # shared by draft and target, as the reference shares it
    traj_q, traj_p = q.run(noise), p.run(noise)
    v = exact_verify(traj_q, q, p, g, independent=True)
    exact = p.token(v.samples)  # the target's last step on each kept or resampled trajectory
    w = paper_verify(q.token(traj_q), q.last_step(traj_q), p.last_step(traj_p), g)
    return alone, exact, v, w, q.token(traj_q)


def test_head_chain_exact_rule_reproduces_the_target_head_and_paper_rule_does_not():
    alone, exact, v, w, drafts = head_outputs(seed=10)
    crit = lambda d: ks_pvalue(d, M, M)  # noqa: E731
    project = lambda t: t.sum(-1)  # noqa: E731  (a 1-D summary the KS test reads)
    assert 0.2 < v.accepted.double().mean().item() < 0.9
    for d in range(4):
        assert crit(ks_two_sample_statistic(exact[:, d], alone[:, d])) > ALPHA
    assert crit(ks_two_sample_statistic(project(exact), project(alone))) > ALPHA
    # negative control: the draft head's tokens
    assert crit(ks_two_sample_statistic(project(drafts), project(alone))) < 1e-6
    # the reference's rule on the same draws is off by as much as the drafts
    d_paper = ks_two_sample_statistic(project(w.samples), project(alone))
    assert crit(d_paper) < 1e-6


# -- the strategy on the mar pipeline ----------------------------------------------------------
def tiny_mar(seed: int = 0, depth: int = 2, width: int = 16, steps: str = "3", **overrides):
    """A random float64 MAR: 4 x 4 tokens of 2 numbers, 3 classes, a head of ``steps`` steps."""
    from decodekit.pipelines.mar import MARConfig, MARModel

    config = dict(
        img_size=16, vae_stride=4, patch_size=1, vae_embed_dim=2, encoder_embed_dim=width,
        encoder_depth=depth, encoder_num_heads=2, decoder_embed_dim=width, decoder_depth=depth,
        decoder_num_heads=2, class_num=3, buffer_size=2, diffloss_d=1, diffloss_w=16,
        num_sampling_steps=steps,
    )  # fmt: skip
    config.update(overrides)
    g = torch.Generator().manual_seed(seed)
    model = MARModel(MARConfig(**config)).double()
    with torch.no_grad():  # random weights everywhere (MAR starts some at zero)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return model.eval()


class NoAutoencoder:
    """The pipeline's VAE slot when only tokens are compared (``output_type="latents"``)."""


@pytest.fixture(scope="module")
def mar_pipe():
    from decodekit.pipelines.mar_pipeline import MARPipeline

    return MARPipeline(tiny_mar(), NoAutoencoder())


def row_generators(seeds=(3, 4, 5)):
    return [torch.Generator().manual_seed(s) for s in seeds]


MAR_CALL = dict(num_iter=8, cfg=2.5, cfg_schedule="linear", temperature=1.0, output_type="latents")


def cspd(draft, **params) -> dict:
    return {"name": "cspd", "params": {"draft": draft, **params}}


@pytest.mark.parametrize("gamma", [1, 3])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_exact_draft_equal_to_target_is_the_plain_pipeline_bit_for_bit(mar_pipe, gamma, cfg):
    import copy

    import decodekit

    call = {**MAR_CALL, "cfg": cfg}
    plain = mar_pipe([0, 1, 2], generator=row_generators(), **call)
    draft = copy.deepcopy(mar_pipe.model)  # the same weights, another object
    with decodekit.attach(mar_pipe, [cspd(draft, gamma=gamma, acceptance="exact")]) as run:
        out = mar_pipe([0, 1, 2], generator=row_generators(), **call)
    assert torch.equal(out.tokens, plain.tokens)
    stats = run.stats["strategies"]["cspd"]
    assert stats["acceptance_rate"] == 1.0
    assert stats["resample_tries"] == 0 and stats["dropped_tokens"] == 0
    prefill = sum(1 for s in range(8) if s <= 8 * 0.15)  # steps 0 and 1
    assert stats["target_forwards"] == 8  # one per step: exact mode saves none
    assert stats["draft_forwards"] == 8 - prefill
    prefilled = sum(mar_pipe.decoder.positions(s).numel() for s in range(prefill))
    assert stats["draft_tokens"] == 16 * 3 - prefilled


def test_paper_with_one_draft_step_and_draft_equal_to_target_is_the_plain_pipeline(mar_pipe):
    import copy

    import decodekit

    plain = mar_pipe([0, 1, 2], generator=row_generators(), **MAR_CALL)
    draft = copy.deepcopy(mar_pipe.model)
    with decodekit.attach(mar_pipe, [cspd(draft, gamma=1, acceptance="paper")]) as run:
        out = mar_pipe([0, 1, 2], generator=row_generators(), **MAR_CALL)
    assert torch.equal(out.tokens, plain.tokens)
    assert run.stats["strategies"]["cspd"]["acceptance_rate"] == 1.0


def test_paper_verifies_a_window_in_one_target_forward(mar_pipe):
    import decodekit

    with decodekit.attach(mar_pipe, [cspd(tiny_mar(seed=1, depth=1), gamma=3)]) as run:
        out = mar_pipe([0, 1, 2], generator=row_generators(), **MAR_CALL)
    stats = run.stats["strategies"]["cspd"]
    # num_iter 8, prefill steps 0-1, windows end at multiples of 3 or the last step: 2-3, 4-6, 7
    assert stats["windows"] == 3
    assert stats["target_forwards"] == 2 + 3 and stats["draft_forwards"] == 6
    assert out.forwards == 11 and run.stats["nfe"] == 11
    verified = stats["accepted_tokens"] + stats["resampled_tokens"]
    assert verified == stats["draft_tokens"] and stats["dropped_tokens"] == 0
    assert not out.tokens.isnan().any()


def test_run_totals_add_up_the_calls_counters(mar_pipe):
    import decodekit

    with decodekit.attach(mar_pipe, [cspd(tiny_mar(seed=1, depth=1), gamma=3)]) as run:
        calls = []
        for seed in (1, 2):
            mar_pipe([0, 1], generator=row_generators((seed, seed + 10)), **MAR_CALL)
            calls.append(run.stats["strategies"]["cspd"])
        totals = run.stats["totals"]["cspd"]
    strategy = run.strategies[0]
    assert set(strategy.counters) < set(calls[0])
    for key in strategy.counters:
        assert totals[key] == calls[0][key] + calls[1][key], key
    verified = totals["accepted_tokens"] + totals["resampled_tokens"]
    assert verified > 0 and totals["acceptance_rate"] == totals["accepted_tokens"] / verified


def test_rows_do_not_depend_on_their_batch_mates(mar_pipe):
    import decodekit

    draft = tiny_mar(seed=1, depth=1)
    for acceptance in ("paper", "exact"):
        with decodekit.attach(mar_pipe, [cspd(draft, gamma=3, acceptance=acceptance)]):
            both = mar_pipe([0, 2], generator=row_generators((3, 5)), **MAR_CALL).tokens
            alone = mar_pipe([2], generator=row_generators((5,)), **MAR_CALL).tokens
        torch.testing.assert_close(both[1:], alone, rtol=1e-9, atol=1e-9)


def test_cspd_params_and_drafts_that_do_not_fit_are_refused(mar_pipe, tmp_path):
    import decodekit
    from decodekit.errors import ConfigError
    from decodekit.session import attached_run

    draft = tiny_mar(seed=1, depth=1)
    bad = [
        (cspd(draft, gamma=0), r"params\.gamma: Input should be greater than or equal to 1"),
        (cspd(draft, prefill_ratio=1.5), r"params\.prefill_ratio: Input should be less"),
        (cspd(draft, acceptance="loose"), r"params\.acceptance: Input should be 'paper' or"),
        (cspd(mar_pipe, gamma=2), r"params\.draft: .*expected zoo:<name>, a folder or a MARModel"),
        ({"name": "cspd", "params": {}}, r"params\.draft: Field required"),
        (cspd(tiny_mar(img_size=8)), r"params\.draft: .*seq_len 4 \(the pipeline has 16\)"),
        (cspd(tiny_mar(steps="4")), r"params\.draft: the draft's head samples in 4 steps"),
        (cspd(draft.float()), r"params\.draft: .*move it first"),
        (cspd(str(tmp_path)), r"params\.draft: .*holds no MAR model"),
    ]
    for spec, message in bad:
        with pytest.raises(ConfigError, match=r"strategies\.0\." + message):
            decodekit.attach(mar_pipe, [spec])
        assert attached_run(mar_pipe) is None


def test_exact_refuses_temperature_zero(mar_pipe):
    import decodekit
    from decodekit.errors import ConfigError

    with decodekit.attach(mar_pipe, [cspd(tiny_mar(seed=1, depth=1), acceptance="exact")]):
        with pytest.raises(ConfigError, match="temperature > 0"):
            mar_pipe([0], generator=row_generators((3,)), **{**MAR_CALL, "temperature": 0.0})


def test_draft_folders_load_and_the_strategy_is_listed(mar_pipe, tmp_path, capsys):
    import decodekit
    from decodekit.cli import main

    draft = tiny_mar(seed=1, depth=1)
    draft.save_pretrained(tmp_path / "draft")
    with decodekit.attach(mar_pipe, [cspd(str(tmp_path / "draft"), gamma=2)]) as run:
        loaded = run.strategies[0].draft
        assert loaded is not draft and next(loaded.parameters()).dtype == torch.float64
        a = mar_pipe([1], generator=row_generators((7,)), **MAR_CALL).tokens
    with decodekit.attach(mar_pipe, [cspd(draft, gamma=2)]):
        b = mar_pipe([1], generator=row_generators((7,)), **MAR_CALL).tokens
    assert torch.equal(a, b)
    assert main(["plugins"]) == 0
    assert "cspd" in capsys.readouterr().out


def random_head(steps: int, g: torch.Generator):
    """A float64 MAR DiffusionHead (2 numbers a token, width 16) of ``steps`` steps, weights N(0, 0.2²)."""
    from decodekit.pipelines.mar import DiffusionHead, MARConfig

    config = MARConfig(
        img_size=8, vae_stride=4, vae_embed_dim=2, encoder_embed_dim=8, encoder_depth=1,
        encoder_num_heads=2, decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2,
        class_num=2, buffer_size=1, diffloss_d=1, diffloss_w=16, num_sampling_steps=str(steps),
    )  # fmt: skip
    head = DiffusionHead(config).double()
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    return head


def test_head_density_is_the_samplers_and_exact_rule_reproduces_the_target_head():
    """On MAR's own DiffusionHead: the trajectory density the strategy computes is the
    sampler's, and draft + exact verification gives the target head's tokens."""
    from decodekit.plugins.cspd import HeadDensity, trajectory_log_prob

    n = 5000
    g = torch.Generator().manual_seed(0)
    target, draft = random_head(3, g), random_head(3, g)
    z = torch.randn(1, 8, generator=g, dtype=torch.float64).expand(n, 8).contiguous()
    p, q = HeadDensity(target, z, None, 1.0, 1.3), HeadDensity(draft, z, None, 1.0, 1.3)
    every = torch.arange(n)
    traj = draft.sample(z, 1.3, noise=draft.draw_noise(n, g, dtype=torch.float64), trajectory=True)
    samples = traj.states[:-1].transpose(0, 1)  # (n, S, D)
    assert torch.equal(q.log_prob(samples, every), trajectory_log_prob(traj))
    _, token = q.evaluate(samples, every)
    assert torch.equal(token, traj.sample)  # the last step's mean is the sampler's token
    assert torch.equal(q.token(samples, every), traj.sample)
    y, log_p = p.sample_with_log_prob(every[:50], g)  # the sampler's own density of its draws
    torch.testing.assert_close(log_p, p.log_prob(y, every[:50]), rtol=1e-12, atol=1e-9)
    alone = target.sample(z, 1.3, noise=target.draw_noise(n, g, dtype=torch.float64))
    v = exact_verify(samples, q, p, g, independent=True)
    _, out = p.evaluate(v.samples, every)
    for d in range(2):
        assert ks_pvalue(ks_two_sample_statistic(out[:, d], alone[:, d]), n, n) > ALPHA
        assert ks_pvalue(ks_two_sample_statistic(traj.sample[:, d], alone[:, d]), n, n) < 1e-6
    # the same head as draft: every trajectory kept, the target's own tokens
    v = exact_verify(samples, q, q, g, independent=True)
    assert v.accepted.all() and int(v.tries.sum()) == 0


def test_head_density_evaluates_guided_trajectories_in_bounded_calls(monkeypatch):
    """Guided, and split into calls of at most EVAL_ROWS rows: still the sampler's density and token."""
    import decodekit.plugins.cspd as cspd_module
    from decodekit.plugins.cspd import HeadDensity, trajectory_log_prob

    g = torch.Generator().manual_seed(3)
    head = random_head(5, g)
    n = 7
    z, zu = (torch.randn(n, 8, generator=g, dtype=torch.float64) for _ in range(2))
    noise = head.draw_noise(n, g, dtype=torch.float64)
    traj = head.sample(z, 0.9, 2.0, z_uncond=zu, noise=noise, trajectory=True)
    samples, every = traj.states[:-1].transpose(0, 1), torch.arange(n)
    whole = HeadDensity(head, z, zu, 2.0, 0.9).evaluate(samples, every)
    monkeypatch.setattr(cspd_module, "EVAL_ROWS", 2 * head.num_steps)  # 2 trajectories a call
    split = HeadDensity(head, z, zu, 2.0, 0.9).evaluate(samples, every)
    for log_p, token in (whole, split):
        torch.testing.assert_close(log_p, trajectory_log_prob(traj), rtol=0, atol=1e-10)
        torch.testing.assert_close(token, traj.sample, rtol=0, atol=1e-12)


def test_cspd_runs_from_yaml_and_validate_names_a_bad_param(tmp_path, capsys):
    import yaml
    from decodekit.cli import main
    from decodekit.pipelines.mar_pipeline import MARPipeline
    from decodekit.testing import tiny_vae

    vae = tiny_vae()
    MARPipeline(tiny_mar(vae_embed_dim=4), vae, ["a", "b", "c"]).save_pretrained(tmp_path / "t")
    MARPipeline(tiny_mar(seed=1, depth=1, vae_embed_dim=4), vae, ["a", "b", "c"]).save_pretrained(
        tmp_path / "d"
    )
    config = {
        "pipeline": {"type": "mar", "model": str(tmp_path / "t"), "dtype": "float64"},
        "strategies": [cspd(str(tmp_path / "d"), gamma=3, acceptance="exact")],
        "inputs": {"prompt": ["a", "c"], "num_iter": 6, "cfg": 2.0, "seed": 0},
        "output": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "cspd.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["validate", str(path)]) == 0
    assert main(["run", str(path)]) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 2
    config["strategies"][0]["params"]["acceptance"] = "nearly"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["validate", str(path)]) != 0
    assert "strategies.0.params.acceptance" in capsys.readouterr().err
    # a draft folder holding another autoencoder is refused
    other = tiny_vae()
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    MARPipeline(tiny_mar(seed=1, depth=1, vae_embed_dim=4), other, ["a", "b", "c"]).save_pretrained(
        tmp_path / "other"
    )
    config["strategies"][0]["params"].update(acceptance="paper", draft=str(tmp_path / "other"))
    config["output"]["dir"] = str(tmp_path / "out2")
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) != 0
    assert "another autoencoder" in capsys.readouterr().err


class GaussianDenoiser(torch.nn.Module):
    """A head network with the exact noise prediction for tokens ``x0 ~ N(A z + b, s^2)``.

    Stands in for a trained head (a random one gives tokens of huge scale): for
    ``x_t = sqrt(a) x0 + sqrt(1 - a) eps``, ``E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) m) /
    (a s^2 + 1 - a)``; ``v`` = 1 selects the variance ``beta`` for every step.
    """

    def __init__(self, alphas_cumprod, A, b, s):
        super().__init__()
        self.register_buffer("ac", alphas_cumprod.double())
        self.A, self.b, self.s = A, b, s

    def forward(self, x, t, z):
        a = self.ac[t][:, None].to(x.dtype)
        m = z @ self.A.T + self.b
        eps = (1 - a).sqrt() * (x - a.sqrt() * m) / (a * self.s**2 + 1 - a)
        return torch.cat((eps, torch.ones_like(eps)), -1)


def test_exact_mode_samples_the_plain_target_pipeline_and_paper_mode_does_not():
    import copy

    import decodekit
    from decodekit.pipelines.mar_pipeline import MARPipeline

    n = 6000
    target = tiny_mar(depth=1, width=8, img_size=8)  # 4 tokens of 2 numbers, 3 head steps
    g = torch.Generator().manual_seed(0)
    A = 0.5 * torch.randn(2, 8, generator=g, dtype=torch.float64)
    schedule = target.diffloss.train_schedule.alphas_cumprod
    target.diffloss.net = GaussianDenoiser(schedule, A, torch.zeros(2, dtype=torch.float64), 0.5)
    draft = copy.deepcopy(target)
    draft.diffloss.net.b = draft.diffloss.net.b + 0.3  # the draft's tokens sit 0.3 off
    pipe = MARPipeline(target, NoAutoencoder())
    call = dict(num_iter=4, cfg=1.0, temperature=1.0, output_type="latents")
    plain = pipe([0] * n, generator=torch.Generator().manual_seed(1), **call).tokens
    drafts = MARPipeline(draft, NoAutoencoder())(
        [0] * n, generator=torch.Generator().manual_seed(2), **call
    ).tokens

    def smallest_p(tokens):  # the 8 numbers of a row: 4 positions x 2, each against plain
        d = max(
            ks_two_sample_statistic(tokens[:, i, c], plain[:, i, c])
            for i in range(4)
            for c in range(2)
        )
        return ks_pvalue(d, n, n)

    out, stats = {}, {}
    for acceptance in ("exact", "paper"):
        params = dict(gamma=2, prefill_ratio=0.0, acceptance=acceptance)
        with decodekit.attach(pipe, [cspd(draft, **params)]) as run:
            out[acceptance] = pipe([0] * n, generator=torch.Generator().manual_seed(3), **call)
        stats[acceptance] = run.stats["strategies"]["cspd"]
    assert 0.5 < stats["exact"]["acceptance_rate"] < 0.95  # both paths exercised
    assert stats["exact"]["dropped_tokens"] > 0 and stats["exact"]["zero_tokens"] == 0
    assert smallest_p(out["exact"].tokens) > ALPHA / 8  # Bonferroni over the 8 tests
    assert smallest_p(drafts) < 1e-12  # negative control: the draft alone
    assert smallest_p(out["paper"].tokens) < 1e-6  # the reference's rule is off here
