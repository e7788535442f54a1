"""Oracles of `sjd` (Speculative Jacobi Decoding, arXiv:2410.01699).

Two targets: `TableDecoder`, an `ImageTokenDecoder` over a random table of
conditional distributions (the contract, no model: exact distributions fast),
and the `ar-image` pipeline on a tiny random float64 Llama + VQModel (greedy SJD
equals greedy decoding token for token; the sampled joint distribution equals
the enumerated one).
"""

from __future__ import annotations

from types import SimpleNamespace

import decodekit
import pytest
import torch
from decodekit.plugins.sjd import Sjd
from decodekit.sampler import Sampler
from decodekit.speculative import SpeculativeVerdict, accept_or_resample_rows
from decodekit.testing import StrategyTesterMixin, chi_square_pvalue, enumerate_joint

from tests.tiny import AR_IMAGE_TOKENS, tiny_ar_image_pipeline

N = AR_IMAGE_TOKENS[0] * AR_IMAGE_TOKENS[1]
PROMPTS = ["a red circle", "blue square on the left", "green", "a big triangle"]


# -- a decoder without a model ------------------------------------------------------------------
class TableDecoder:
    """The `ImageTokenDecoder` contract over a fixed autoregressive distribution, without a model.

    ``p(x_k | x_<k)`` is the softmax of random logits looked up by the prefix
    (peaked by ``sharpness``); greedy takes the one-hot argmax. One forward per
    `probs_after`, as the pipeline's decoder counts them.
    """

    def __init__(self, batch, length, vocab, generators=None, sharpness=3.0, seed=0, width=None):
        self.batch, self.length, self.vocab_size = batch, length, vocab
        self.generators = generators
        self.greedy = generators is None
        self.config = SimpleNamespace(image_tokens=(length // (width or length), width or length))
        self.stats = {}
        g = torch.Generator().manual_seed(seed)
        # one logit row per prefix of every length 0 .. length-1, prefixes of length t at
        # offset[t] + (their flat index)
        sizes = [vocab**t for t in range(length)]
        self.offset = torch.tensor([sum(sizes[:t]) for t in range(length)])
        self.table = sharpness * torch.randn(sum(sizes), vocab, generator=g, dtype=torch.float64)
        self._committed = torch.zeros(batch, dtype=torch.long)
        self._codes = torch.full((batch, length), -1, dtype=torch.long)
        self.forwards = 1  # the prefill
        self._fed = None

    @property
    def committed(self):
        return self._committed.clone()

    @property
    def committed_counts(self):
        return self._committed.tolist()

    @property
    def codes(self):
        return self._codes.clone()

    def _probs(self, lengths, index):
        logits = self.table[self.offset[lengths.clamp(max=self.length - 1)] + index]
        if self.greedy:
            return torch.nn.functional.one_hot(logits.argmax(-1), self.vocab_size).double()
        return logits.softmax(-1)

    def next_probs(self, prefixes: torch.Tensor) -> torch.Tensor:
        """``(M, t)`` prefixes -> ``(M, V)`` distributions of the next code."""
        t = prefixes.shape[1]
        index = (prefixes * self.vocab_size ** torch.arange(t - 1, -1, -1)).sum(-1)
        return self._probs(torch.full_like(index, t), index)

    def probs_after(self, tokens: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
        B, n = tokens.shape
        assert n <= self.length - int(self._committed.min())
        V = self.vocab_size
        index = torch.zeros(B, dtype=torch.long)
        for k in range(self.length):  # flat index of each committed prefix
            inside = k < self._committed
            index = torch.where(inside, index * V + self._codes[:, k].clamp(min=0), index)
        out = torch.zeros(B, n + 1, V, dtype=torch.float64)
        for i in range(n + 1):
            length = self._committed + i
            live = length < self.length
            out[:, i] = self._probs(length, torch.where(live, index, 0)) * live[:, None]
            if i < n:
                index = index * V + tokens[:, i]
        self._fed = tokens.clone()
        self.forwards += 1
        return out

    def commit(
        self, num: torch.Tensor, tokens: torch.Tensor | None = None, *, validate: bool = True
    ) -> None:
        tokens = self._fed if tokens is None else tokens
        for b in range(self.batch):
            k, c = int(num[b]), int(self._committed[b])
            assert c + k <= self.length
            self._codes[b, c : c + k] = tokens[b, :k]
            self._committed[b] += k
        self._fed = None

    def decode_plain(self) -> torch.Tensor:
        for k in range(self.length):
            p = self.next_probs(self._codes[:, :k])
            if self.greedy:
                self._codes[:, k] = p.argmax(-1)
            else:
                for b in range(self.batch):
                    self._codes[b, k] = torch.multinomial(p[b], 1, generator=self.generators[b])
        self._committed[:] = self.length
        return self.codes


def _gens(n, seed=0):
    return [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(n)]


def _run(strategy: Sjd, decoder) -> torch.Tensor:
    strategy.reset(None)
    codes = strategy.decodekit_image_tokens(None, decoder)
    assert bool((codes >= 0).all()) and bool((decoder.committed == decoder.length).all())
    return codes


@pytest.mark.parametrize("init", ["random", "horizontal-repeat", "vertical-repeat"])
@pytest.mark.parametrize("window", [1, 2, 5, 16])
def test_table_greedy_equals_plain(window, init):
    plain = TableDecoder(4, 8, 5, seed=1, width=4).decode_plain()
    s = Sjd({"window": window, "init": init})
    codes = _run(s, TableDecoder(4, 8, 5, seed=1, width=4))
    assert torch.equal(codes, plain)
    assert s.stats()["steps"] <= 8


@pytest.mark.parametrize("coupling", ["independent", "coupled"])
@pytest.mark.parametrize("init", ["random", "horizontal-repeat"])
def test_table_joint_distribution(coupling, init):
    V, N, S = 3, 4, 6000
    ref = TableDecoder(1, N, V, generators=_gens(1), sharpness=1.5, seed=2, width=2)
    joint = enumerate_joint(ref.next_probs, V, N)
    dec = TableDecoder(S, N, V, generators=_gens(S, 1), sharpness=1.5, seed=2, width=2)
    codes = _run(Sjd({"window": 2, "init": init, "coupling": coupling}), dec)
    assert chi_square_pvalue(codes, joint, V) > 1e-3


class AcceptAll(Sjd):
    """Negative control: every draft passes (q replaced by p where the draft has mass)."""

    def verify(self, p, q, drafts, generators, lengths, bonus, has_bonus):
        q = torch.where(q > 0, p, q)
        return accept_or_resample_rows(
            p, q, drafts, generators, lengths, bonus_probs=bonus, has_bonus=has_bonus
        )


class NoResidual(Sjd):
    """Negative control: after a rejection, draw from p instead of the residual (p - q)+."""

    def verify(self, p, q, drafts, generators, lengths, bonus, has_bonus):
        v = accept_or_resample_rows(
            p, q, drafts, generators, lengths, bonus_probs=bonus, has_bonus=has_bonus
        )
        nxt = v.next_token.clone()
        for b in range(p.shape[0]):
            a, m = int(v.num_accepted[b]), int(lengths[b])
            if a < m:
                nxt[b] = torch.multinomial(p[b, a], 1, generator=generators[b])[0]
        return SpeculativeVerdict(v.accepted, v.num_accepted, nxt)


@pytest.mark.parametrize("control", [AcceptAll, NoResidual])
def test_table_negative_controls_fail(control):
    V, S = 3, 6000
    ref = TableDecoder(1, 4, V, generators=_gens(1), sharpness=1.5, seed=2, width=2)
    joint = enumerate_joint(ref.next_probs, V, 4)
    dec = TableDecoder(S, 4, V, generators=_gens(S, 1), sharpness=1.5, seed=2, width=2)
    codes = _run(control({"window": 2}), dec)
    assert chi_square_pvalue(codes, joint, V) < 1e-12


# -- the ar-image pipeline -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    return tiny_ar_image_pipeline()


def sjd_codes(pipe, prompts, params, *, scale=1.0, sampler=None, generators=None):
    """SJD over the pipeline's decoder; returns (codes, stats)."""
    decoder = pipe.decoder_for(
        prompts,
        guidance_scale=scale,
        sampler=sampler or Sampler(temperature=0),
        generator=generators,
    )
    strategy = Sjd(params)
    strategy.reset(None)
    codes = strategy.decodekit_image_tokens(None, decoder)
    assert decoder.done and decoder.forwards == 1 + strategy.stats()["steps"]
    return codes, strategy.stats()


@pytest.fixture(scope="module")
def greedy_plain(pipe):
    return {
        (scale, batch): pipe(
            PROMPTS[:batch], guidance_scale=scale, temperature=0, output_type="codes"
        ).codes
        for scale in (1.0, 3.0)
        for batch in (1, 4)
    }


@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("init", ["random", "horizontal-repeat", "vertical-repeat"])
@pytest.mark.parametrize("window", [1, 2, 5, 16, N])
def test_greedy_sjd_equals_greedy_decoding(pipe, greedy_plain, window, init, scale):
    for batch in (1, 4):
        codes, stats = sjd_codes(
            pipe, PROMPTS[:batch], {"window": window, "init": init}, scale=scale
        )
        assert torch.equal(codes, greedy_plain[scale, batch])
        assert stats["steps"] <= N and stats["step_compression"] >= 1
    if window > 1:
        # the rows of the batch verified their windows independently: they took different paths
        assert len(set(stats["row_steps"])) > 1 or len(set(stats["row_accepted"])) > 1, stats


# -- exact distribution through the pipeline ------------------------------------------------------
DIST_CODES, DIST_SHAPE, DIST_PROMPT = 5, (1, 3), "a red circle"
DIST_SAMPLER = Sampler(temperature=1.0, top_k=4)
DIST_SCALE, DIST_DRAWS, DIST_CHUNK = 2.0, 20_000, 5_000


@pytest.fixture(scope="module")
def dist_pipe():
    return tiny_ar_image_pipeline(seed=3, codes=DIST_CODES, layers=1, image_tokens=DIST_SHAPE)


@pytest.fixture(scope="module")
def dist_joint(dist_pipe):
    """The exact joint of the 3 codes: product of uncached, guided, top-k'd conditionals."""
    from decodekit.logits_processors import classifier_free_guidance

    pipe, cfg = dist_pipe, dist_pipe.config
    ids, mask = pipe.encode_prompts([DIST_PROMPT])
    null_ids, null_mask = pipe.encode_prompts([cfg.null_prompt])
    ids, mask = torch.cat([ids, null_ids]), torch.cat([mask, null_mask])  # (2, P)

    def next_probs(prefixes):  # (M, t) -> (M, K)
        M = prefixes.shape[0]
        rows = torch.cat([prefixes, prefixes])  # cond rows, then uncond rows
        x = torch.cat([ids.repeat_interleave(M, 0), rows + cfg.code_offset], dim=1)
        m = torch.cat([mask.repeat_interleave(M, 0), torch.ones_like(rows)], dim=1)
        pos = (m.cumsum(dim=1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = pipe.lm(input_ids=x, attention_mask=m, position_ids=pos).logits[:, -1]
        logits = logits[:, cfg.code_offset : cfg.code_offset + cfg.codebook_size]
        cond, uncond = logits.chunk(2)
        guided = classifier_free_guidance(cond, uncond, DIST_SCALE, convention="standard")
        return DIST_SAMPLER.probs(guided)

    return enumerate_joint(next_probs, DIST_CODES, DIST_SHAPE[0] * DIST_SHAPE[1])


def draws(pipe, strategy=None, seed=0, total=DIST_DRAWS):
    """``total`` images of ``DIST_PROMPT``, ``DIST_CHUNK`` rows per call, a generator per row."""
    out = []
    for start in range(0, total, DIST_CHUNK):
        gens = _gens(DIST_CHUNK, seed * 1_000 + start)
        kw = dict(guidance_scale=DIST_SCALE, generator=gens)
        if strategy is None:
            out.append(
                pipe(
                    [DIST_PROMPT] * DIST_CHUNK,
                    temperature=DIST_SAMPLER.temperature,
                    top_k=DIST_SAMPLER.top_k,
                    output_type="codes",
                    **kw,
                ).codes
            )
        else:
            decoder = pipe.decoder_for([DIST_PROMPT] * DIST_CHUNK, sampler=DIST_SAMPLER, **kw)
            strategy.reset(None)
            out.append(strategy.decodekit_image_tokens(None, decoder))
    return torch.cat(out)


def test_plain_sampling_matches_the_enumerated_joint(dist_pipe, dist_joint):
    # the harness's positive control: the pipeline's own token-by-token sampling
    assert chi_square_pvalue(draws(dist_pipe), dist_joint, DIST_CODES) > 1e-3


@pytest.mark.parametrize(
    "params",
    [
        {"window": 2, "init": "random", "coupling": "independent"},
        {"window": 2, "init": "horizontal-repeat", "coupling": "coupled"},
    ],
)
def test_sampled_sjd_matches_the_enumerated_joint(dist_pipe, dist_joint, params):
    codes = draws(dist_pipe, Sjd(params))
    assert chi_square_pvalue(codes, dist_joint, DIST_CODES) > 1e-3


def test_distribution_test_catches_an_inexact_acceptance(dist_pipe, dist_joint):
    codes = draws(dist_pipe, NoResidual({"window": 2}))
    assert chi_square_pvalue(codes, dist_joint, DIST_CODES) < 1e-6


# -- through attach ----------------------------------------------------------------------------
def call(pipe, prompts, seed, row_offset=0, **kw):
    gens = [
        torch.Generator().manual_seed(seed * 1_000 + row_offset + i) for i in range(len(prompts))
    ]
    kw = {"guidance_scale": 2.0, "temperature": 1.0, "top_k": 6, "output_type": "codes", **kw}
    return pipe(prompts, generator=gens, **kw)


class TestSjdContract(StrategyTesterMixin):
    atol = 0
    strategies = [{"name": "sjd", "params": {"window": 4, "coupling": "coupled"}}]

    def make_pipeline(self):
        return tiny_ar_image_pipeline()

    def sample_inputs(self):
        return PROMPTS[:3]

    def run_pipeline(self, pipe, inputs, seed, row_offset=0):
        codes = call(pipe, inputs, seed, row_offset).codes
        # the pipeline keeps its last call's decoder as `pipe.decoder` (a per-call object
        # that the attach/detach fingerprint would count as a change)
        vars(pipe).pop("decoder", None)
        return codes

    def broken_call(self, pipe):
        pipe(PROMPTS[:1], temperature=1.0, generator=None)  # sampling without generators


def test_attached_sjd_reports_its_steps_and_the_forward_ratio(pipe):
    with decodekit.attach(pipe, [{"name": "sjd", "params": {"window": 16}}]) as run:
        out = pipe(PROMPTS, temperature=0, guidance_scale=3.0, output_type="codes")
        stats = run.stats["sjd"] if "sjd" in run.stats else run.last
        ideal = run.ideal_speedup()
    plain = pipe(PROMPTS, temperature=0, guidance_scale=3.0, output_type="codes")
    assert torch.equal(out.codes, plain.codes)
    assert out.stats["steps"] == out.forwards - 1 and plain.forwards == N
    assert ideal is None  # SJD saves forwards, not FLOPs: no FLOP-ideal speed-up to state
    assert out.stats["forward_ratio"] == pytest.approx(plain.forwards / out.forwards)
    assert out.stats["step_compression"] == pytest.approx(N / out.stats["steps"])
    assert stats is not None


def test_same_generators_same_images(pipe):
    params = {"window": 5, "init": "vertical-repeat"}
    with decodekit.attach(pipe, [{"name": "sjd", "params": params}]):
        a = call(pipe, PROMPTS, seed=7, output_type="pil")
        b = call(pipe, PROMPTS, seed=7, output_type="pil")
        c = call(pipe, PROMPTS, seed=8)
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, c.codes)
    assert [x.tobytes() for x in a.images] == [x.tobytes() for x in b.images]
