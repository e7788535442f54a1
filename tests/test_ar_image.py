"""ar-image: `ARImagePipeline` and its `ImageTokenDecoder` on a tiny random float64 Llama + VQModel.

The core oracle is a hand-written reference loop: a full forward over the
whole sequence at every position (no cache), guidance combined by hand, the
sampler's distribution, one draw per row from that row's generator. The
pipeline (K/V cache, doubled batch inside the decoder) must give the same codes
token for token. The decoder's invariant: after any probs_after/commit
sequence, its distributions equal a fresh full forward over the committed
prefix (1e-10 in float64).
"""

from __future__ import annotations

import decodekit
import pytest
import torch
from decodekit.errors import ConfigError
from decodekit.hookspecs import hookimpl
from decodekit.pipelines.ar_image import ARImageConfig, ARImageOutput, ARImagePipeline
from decodekit.sampler import Sampler, sample_categorical
from decodekit.session import attached_run
from decodekit.strategy import Strategy

from tests.tiny import AR_CODES, AR_IMAGE_TOKENS, tiny_ar_image_pipeline

N = AR_IMAGE_TOKENS[0] * AR_IMAGE_TOKENS[1]
PROMPTS = ["a red circle", "blue square on the left", "green"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_ar_image_pipeline()


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# -- the reference: full forward per position, no cache ---------------------------------------
def prompt_rows(pipe, prompts, scale):
    ids, mask = pipe.encode_prompts(prompts)
    if scale > 1:
        null_ids, null_mask = pipe.encode_prompts([pipe.config.null_prompt] * len(prompts))
        ids, mask = torch.cat([ids, null_ids]), torch.cat([mask, null_mask])
    return ids, mask


def full_logits(pipe, ids, mask, codes):
    """Code logits of the next position after ``codes`` (R, c), one uncached forward ``(R, K)``."""
    cfg = pipe.config
    x = torch.cat([ids, codes + cfg.code_offset], dim=1)
    m = torch.cat([mask, torch.ones_like(codes)], dim=1)
    pos = (m.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = pipe.lm(input_ids=x, attention_mask=m, position_ids=pos).logits[:, -1]
    return logits[:, cfg.code_offset : cfg.code_offset + cfg.codebook_size]


def guided(logits, scale):
    if scale <= 1:
        return logits
    cond, uncond = logits.chunk(2)
    return uncond + scale * (cond - uncond)  # written out, not through decodekit


def reference_codes(pipe, prompts, *, scale=1.0, sampler=None, generators=None):
    sampler = sampler if sampler is not None else Sampler()
    ids, mask = prompt_rows(pipe, prompts, scale)
    b = len(prompts)
    codes = torch.zeros(b, 0, dtype=torch.long)
    for _ in range(N):
        both = torch.cat([codes, codes]) if scale > 1 else codes
        probs = sampler.probs(guided(full_logits(pipe, ids, mask, both), scale))  # (B, K)
        if sampler.greedy:
            nxt = probs.argmax(dim=-1)
        else:
            nxt = torch.stack([sample_categorical(probs[i], generators[i]) for i in range(b)])
        codes = torch.cat([codes, nxt[:, None]], dim=1)
    return codes


def fresh_probs(pipe, prompt, prefix, scale, sampler):
    """One row's target distribution after ``prefix`` (c,), from an uncached forward ``(K,)``."""
    ids, mask = prompt_rows(pipe, [prompt], scale)
    codes = prefix[None].expand(ids.shape[0], -1)
    return sampler.probs(guided(full_logits(pipe, ids, mask, codes), scale))[0]


# -- the pipeline --------------------------------------------------------------------------------
def test_output_shapes_codes_and_images(pipe):
    out = pipe(PROMPTS, generator=gens([0, 1, 2]))
    assert isinstance(out, ARImageOutput)
    assert out.codes.shape == (3, N) and out.codes.dtype == torch.long
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < AR_CODES
    h, w = AR_IMAGE_TOKENS
    assert [im.size for im in out.images] == [(2 * w, 2 * h)] * 3  # PIL size is (W, H)
    assert out.forwards == N  # the prefill, then one forward per position but the last
    only = pipe(PROMPTS, generator=gens([0, 1, 2]), output_type="codes")
    assert only.images is None and torch.equal(only.codes, out.codes)


def test_images_are_the_vq_decode_of_the_codes(pipe):
    import numpy as np

    codes = torch.arange(N).remainder(AR_CODES)[None]
    image = pipe.decode_codes(codes)[0]
    h, w = AR_IMAGE_TOKENS
    quant = pipe.vq.quantize.embedding(codes.reshape(1, h, w)).permute(0, 3, 1, 2)
    with torch.no_grad():
        pixels = pipe.vq.decode(quant, force_not_quantize=True).sample
    expect = ((pixels[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(np.asarray(image).astype(float) - expect).max() <= 1


def test_greedy_is_deterministic_and_equals_the_reference(pipe):
    first = pipe(PROMPTS, temperature=0).codes
    assert torch.equal(pipe(PROMPTS, temperature=0).codes, first)
    assert len(set(first[0].tolist())) > 2  # the tiny model does not repeat one code
    assert torch.equal(first, reference_codes(pipe, PROMPTS, sampler=Sampler(temperature=0)))


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_sampling_equals_the_reference_loop(pipe, scale):
    """THE oracle: cached, doubled-batch decoding = full forwards with guidance written out."""
    sampler = Sampler(temperature=0.9, top_k=6, top_p=0.95)
    out = pipe(PROMPTS, guidance_scale=scale, temperature=0.9, top_k=6, top_p=0.95,
               generator=gens([5, 6, 7]))  # fmt: skip
    ref = reference_codes(pipe, PROMPTS, scale=scale, sampler=sampler, generators=gens([5, 6, 7]))
    assert torch.equal(out.codes, ref)


def test_guidance_changes_the_images(pipe):
    plain = pipe(PROMPTS, generator=gens([1, 2, 3])).codes
    cfg = pipe(PROMPTS, guidance_scale=4.0, generator=gens([1, 2, 3])).codes
    assert not torch.equal(plain, cfg)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_a_row_does_not_depend_on_its_batch_mates(pipe, scale):
    batch = pipe(PROMPTS, guidance_scale=scale, generator=gens([11, 12, 13])).codes
    for i, prompt in enumerate(PROMPTS):
        alone = pipe(prompt, guidance_scale=scale, generator=gens([11 + i])).codes
        assert torch.equal(alone[0], batch[i]), i


def test_sampling_needs_generators_and_refuses_bad_arguments(pipe):
    with pytest.raises(ValueError, match="generator"):
        pipe(PROMPTS)
    with pytest.raises(ValueError, match="one per prompt"):
        pipe(PROMPTS, generator=gens([1, 2]))
    with pytest.raises(ValueError, match="at most"):
        pipe("red " * 40, temperature=0)
    with pytest.raises(ValueError, match="output_type"):
        pipe(PROMPTS, temperature=0, output_type="np")
    with pytest.raises(ValueError, match="takes captions"):  # class ids on a text model
        pipe([1, 2], temperature=0)


def test_config_and_folder_round_trip(pipe, tmp_path):
    with pytest.raises(ValueError, match="outside the code range"):
        ARImageConfig((2, 2), code_offset=4, codebook_size=4, boi_token_id=5, pad_token_id=0,
                      max_prompt_tokens=4)  # fmt: skip
    pipe.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "ar_image.json", "lm", "tokenizer", "vq"]  # fmt: skip
    again = ARImagePipeline.from_pretrained(tmp_path / "m", torch_dtype=torch.float64)
    assert again.config == pipe.config
    assert torch.equal(again(PROMPTS, temperature=0).codes, pipe(PROMPTS, temperature=0).codes)
    with pytest.raises(ValueError, match="not supported yet"):
        ARImagePipeline.from_pretrained(tmp_path)


# -- the decoder contract --------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 2.5])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_decoder_matches_a_fresh_forward_after_any_rollback(pipe, scale, temperature):
    """After probs_after/commit with per-row counts (0, partial, the whole window, a resampled
    token that differs from the fed one), every p[:, i] equals an uncached forward."""
    sampler = Sampler(temperature=temperature, top_k=7)
    prompts = PROMPTS
    dec = pipe.decoder_for(prompts, guidance_scale=scale, sampler=sampler,
                           generator=None if sampler.greedy else gens([1, 2, 3]))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    plan = [  # (window, per-row commits, replace the last committed token?)
        (4, [0, 4, 2], False),
        (3, [3, 0, 1], True),
        (0, [0, 0, 0], False),
        (5, [5, 5, 0], True),
        (2, [1, 2, 2], False),
        (1, [1, 0, 1], False),
    ]
    for window, num, replace in plan:
        committed = dec.committed
        tokens = torch.randint(0, AR_CODES, (3, window), generator=g)
        p = dec.probs_after(tokens)
        assert p.shape == (3, window + 1, AR_CODES)
        for b, prompt in enumerate(prompts):
            prefix = dec.codes[b, : committed[b]]
            for i in range(window + 1):
                if committed[b] + i >= N:  # past the image: zeros
                    assert p[b, i].abs().sum() == 0
                    continue
                fresh = fresh_probs(
                    pipe, prompt, torch.cat([prefix, tokens[b, :i]]), scale, sampler
                )
                torch.testing.assert_close(p[b, i], fresh, rtol=0, atol=1e-10)
        keep = tokens.clone()
        if replace:  # the last committed token of each row resampled: not what was fed
            for b, k in enumerate(num):
                if k:
                    keep[b, k - 1] = (keep[b, k - 1] + 1) % AR_CODES
        dec.commit(torch.tensor(num), keep if replace else None)
        assert dec.committed.tolist() == (committed + torch.tensor(num)).tolist()
        for b, k in enumerate(num):
            assert dec.codes[b, committed[b] : committed[b] + k].tolist() == keep[b, :k].tolist()
    # the prefill, then one forward per feed (the empty one feeds the resampled tokens)
    assert dec.forwards == 1 + len(plan)
    slots = dec._slots.shape[1]
    assert slots <= 2 * (pipe.config.max_prompt_tokens + 1 + int(dec.committed.max()))


def test_decoder_zeroes_positions_past_the_image_and_refuses_overruns(pipe):
    dec = pipe.decoder_for(["green"], sampler=Sampler(temperature=0))
    dec.commit(torch.tensor([N - 2]), torch.zeros(1, N - 2, dtype=torch.long))
    p = dec.probs_after(torch.zeros(1, 3, dtype=torch.long))
    assert p[0, :2].sum(dim=-1).tolist() == [1.0, 1.0]
    assert p[0, 2:].abs().sum() == 0
    with pytest.raises(ValueError, match="past the"):
        dec.commit(torch.tensor([3]))
    dec.commit(torch.tensor([2]))
    assert dec.done and dec.codes.min() >= 0
    with pytest.raises(ValueError, match="codes in"):
        dec.probs_after(torch.full((1, 1), AR_CODES))


def test_decode_plain_continues_from_ragged_commits(pipe):
    """A strategy may stop early (return None): plain decoding finishes every row from where it is."""
    dec = pipe.decoder_for(PROMPTS, sampler=Sampler(temperature=0))
    greedy = reference_codes(pipe, PROMPTS, sampler=Sampler(temperature=0))
    dec.commit(torch.tensor([0, 3, 5]), greedy[:, :5])
    assert torch.equal(dec.decode_plain(), greedy)


# -- sessions: the hook, detach, the adapter -------------------------------------------------------
class GreedyWindow(Strategy):
    """Greedy verification of a window of guesses: each step commits the accepted guesses and the
    correction (a token that was not fed), so it exercises commit with replaced tokens."""

    name = "test-greedy-window"
    loops = ("token-autoregression",)

    def __init__(self, window=4, stop_after=None):
        super().__init__()
        self.window, self.stop_after = window, stop_after

    @hookimpl
    def decodekit_image_tokens(self, run, decoder):
        assert run.adapter.model is not None and run.adapter.step == 1  # the prefill
        guesses = torch.zeros(decoder.batch, self.window, dtype=torch.long)
        steps = 0
        while not decoder.done:
            if self.stop_after is not None and steps == self.stop_after:
                return None
            p = decoder.probs_after(guesses)  # (B, L+1, K)
            best = p.argmax(dim=-1)  # (B, L+1)
            ok = (best[:, :-1] == guesses).long().cumprod(dim=1).sum(dim=1)  # (B,)
            left = decoder.length - decoder.committed
            num = torch.minimum(ok + 1, left)
            decoder.commit(num, best)  # best[:, :ok] are the guesses; best[:, ok] the correction
            guesses = torch.roll(best, -1, dims=1)[:, : self.window]
            steps += 1
        decoder.stats["steps"] = steps
        return decoder.codes


def test_a_strategy_decodes_through_the_hook_and_detach_restores(pipe):
    plain = pipe(PROMPTS, temperature=0)
    lm, forward = pipe.lm, pipe.lm.forward
    with decodekit.attach(pipe, [GreedyWindow()], pipeline="ar-image") as run:
        out = pipe(PROMPTS, temperature=0)
        assert attached_run(pipe) is run
    assert torch.equal(out.codes, plain.codes)  # greedy verification is lossless
    assert out.stats["steps"] <= N and run.last["nfe"] == out.forwards
    assert attached_run(pipe) is None and pipe.lm is lm and pipe.lm.forward == forward
    again = pipe(PROMPTS, temperature=0)
    assert torch.equal(again.codes, plain.codes) and again.stats == {}


def test_a_strategy_may_leave_the_rest_to_plain_decoding(pipe):
    plain = pipe(PROMPTS, guidance_scale=2.0, temperature=0).codes
    with decodekit.attach(pipe, [GreedyWindow(window=3, stop_after=2)], pipeline="ar-image"):
        out = pipe(PROMPTS, guidance_scale=2.0, temperature=0)
    assert torch.equal(out.codes, plain)


def test_an_error_in_a_strategy_detaches(pipe):
    class Broken(GreedyWindow):
        name = "test-broken"

        @hookimpl
        def decodekit_image_tokens(self, run, decoder):
            raise RuntimeError("boom")

    run = decodekit.attach(pipe, [Broken()], pipeline="ar-image")
    with pytest.raises(RuntimeError, match="boom"):
        pipe(PROMPTS, temperature=0)
    assert not run.attached and attached_run(pipe) is None


def test_adapter_loads_runs_saves_and_compares(pipe, tmp_path):
    from decodekit.pipelines.ar_image_adapter import ARImageAdapter, ARImageInputs

    pipe.save_pretrained(tmp_path / "m")
    loaded = ARImageAdapter.load(str(tmp_path / "m"), device="cpu", dtype="float64", options={})
    assert ARImageAdapter.matches(loaded) and not ARImageAdapter.matches(pipe.lm)
    inputs = ARImageInputs(prompt=PROMPTS, guidance_scale=2.0, top_k=5, seed=3, batch_size=2)
    images = ARImageAdapter.generate(loaded, inputs)
    assert len(images) == 3
    # rows seeded from their prompt: the same prompt gives the same image anywhere in the list
    moved = ARImageAdapter.generate(loaded, inputs.model_copy(update={"prompt": PROMPTS[::-1]}))
    assert ARImageAdapter.quality(images, moved[::-1]) == {"psnr": float("inf"), "identical": 1.0}
    files = ARImageAdapter.save(images, tmp_path / "out")
    assert [f.name for f in files] == ["000.png", "001.png", "002.png"]
    assert ARImageAdapter.picture(images, moved, tmp_path / "side.png")
    with pytest.raises(ConfigError, match="not supported yet"):
        ARImageAdapter.load(str(tmp_path), device="cpu", dtype="float64", options={})


@pytest.mark.parametrize(
    "bad",
    [
        {"guidance_scale": 0.5},
        {"temperature": -1},
        {"top_k": 0},
        {"top_p": 0.0},
        {"prompt": []},
        {"batch_size": 0},
        {"steps": 3},
    ],
)
def test_inputs_out_of_range_are_refused(bad):
    from decodekit.pipelines.ar_image_adapter import ARImageInputs
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        ARImageInputs(**{"prompt": ["a red circle"], **bad})


@pytest.mark.parametrize("strategy", [None, "sjd"])
@pytest.mark.parametrize("batch", [1, 4])
def test_a_decoding_step_reads_back_from_the_device_once(pipe, strategy, batch):
    # Every read back to the host stalls a GPU. A step of the decoder reads once (the
    # committed counts, in commit); transformers' own mask code reads once per forward;
    # the call adds a constant few. Before the counts were kept on the host, plain
    # decoding read 36 times per step at batch 8 (one per row and check).
    from decodekit.testing import HostReads

    prompts = (PROMPTS * 2)[:batch]
    specs = [] if strategy is None else [{"name": "sjd", "params": {"window": 4}}]
    with decodekit.attach(pipe, specs):
        with HostReads() as reads:
            out = pipe(
                prompts, guidance_scale=2.0, top_k=5, generator=gens(range(batch)),
                output_type="codes",
            )  # fmt: skip
    steps = out.stats.get("steps", pipe.config.num_positions)
    assert reads.total <= steps + out.forwards + 4, dict(reads.counts)
