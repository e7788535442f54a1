"""masked-diffusion-lm: LLaDA semantics, batching, Dream shift, hooks, on tiny random models."""

from __future__ import annotations

import decodekit
import pytest
import torch
from decodekit.hookspecs import hookimpl
from decodekit.pipelines.masked_diffusion import (
    MaskedDiffusionLMPipeline,
    dream_transfer_counts,
)
from decodekit.remasking import transfer_count_schedule
from decodekit.strategy import Strategy
from decodekit.testing import (
    MASK,
    VOCAB,
    CommitRecorder,
    tiny_bidirectional_llama,
    tiny_mdm_pipeline,
)

from tests.tiny import MDM_PROMPTS as PROMPTS
from tests.tiny import EchoModel

Recorder = CommitRecorder  # records x after and the commits of every step


def test_model_is_bidirectional():
    model = tiny_bidirectional_llama()
    a = torch.tensor([[3, 4, 5, 6]])
    b = a.clone()
    b[0, 3] = 7
    with torch.no_grad():
        diff = (model(a).logits[0, 0] - model(b).logits[0, 0]).abs().max()
    assert diff > 1e-6  # a later token changes an earlier position's logits


def test_sampler_invariants():
    pipe = tiny_mdm_pipeline()
    rec = Recorder()
    gen, block, steps = 16, 8, 8
    with decodekit.attach(pipe, [rec]):
        out = pipe(input_ids=PROMPTS, gen_length=gen, block_length=block, steps=steps)
    prompt_len = 4
    assert len(rec.steps) == steps and out.nfe == steps
    schedule = transfer_count_schedule(block, steps // (gen // block)).tolist()
    prev_x = None
    for i, (step, x, committed) in enumerate(rec.steps):
        assert step == i
        blk = i // (steps // (gen // block))
        start = prompt_len + blk * block
        # Only inside the current block, as many per row as scheduled.
        assert not committed[:, :start].any() and not committed[:, start + block :].any()
        assert committed.sum(dim=1).tolist() == [schedule[i % 4]] * 3
        assert not (x[committed] == MASK).any()
        if prev_x is not None:
            assert (prev_x[committed] == MASK).all()  # only masked positions commit
            kept = prev_x != MASK
            assert torch.equal(x[kept], prev_x[kept])  # prompt and committed never change
        prev_x = x
    assert not (out.sequences == MASK).any()


def test_threshold_above_one_commits_one_per_step():
    pipe = tiny_mdm_pipeline()
    rec = Recorder()
    with decodekit.attach(pipe, [rec]):
        out = pipe(input_ids=PROMPTS, gen_length=8, block_length=4, steps=2, threshold=1.5)
    assert out.steps_per_block == [4, 4]
    assert all(c.sum(dim=1).tolist() == [1, 1, 1] for _, _, c in rec.steps)


def test_threshold_zero_commits_a_block_per_step():
    pipe = tiny_mdm_pipeline()
    out = pipe(
        input_ids=PROMPTS,
        gen_length=8,
        block_length=4,
        steps=8,
        remasking="threshold",
        threshold=0.0,
    )
    assert out.steps_per_block == [1, 1] and out.nfe == 2


def test_padded_row_equals_row_alone_and_seed_reproduces():
    pipe = tiny_mdm_pipeline()
    kw = dict(gen_length=8, block_length=4, steps=4, temperature=1.0, cfg_scale=0.5)

    def gens(offset, n):
        return [torch.Generator().manual_seed(100 + offset + i) for i in range(n)]

    batch = pipe(input_ids=PROMPTS, generator=gens(0, 3), **kw).sequences
    for i, row in enumerate(PROMPTS):
        alone = pipe(input_ids=[row], generator=gens(i, 1), **kw).sequences
        assert torch.equal(batch[i : i + 1], alone)
    again = pipe(input_ids=PROMPTS, generator=gens(0, 3), **kw).sequences
    assert torch.equal(batch, again)


@pytest.mark.parametrize("block", [6, 2])  # one block, and blocks after the first
def test_dream_shift_reads_the_left_neighbour(block):
    pipe = MaskedDiffusionLMPipeline(EchoModel(), mask_token_id=MASK, eos_token_id=2)
    out = pipe(input_ids=[[3, 4, 5]], gen_length=6, block_length=block, steps=6, shift=True)
    # Position i is predicted by the output at i - 1, which encodes x_{i-1} + 1.
    assert out.sequences.tolist() == [[6, 7, 8, 9, 10, 11]]
    plain = pipe(input_ids=[[3, 4, 5]], gen_length=6, block_length=6, steps=6)
    assert plain.sequences.tolist() != out.sequences.tolist()


class BlockSpy(Strategy):
    """Wraps the pipeline's remasking policy and records what it is given."""

    name = "block-spy"
    loops = ("masked-diffusion",)

    def reset(self, run):
        self.shapes = []

    @hookimpl
    def decodekit_mdm_select(self, run, step, policy):
        spy = self

        class Spy(type(policy)):
            def __call__(self, logits, x, mask_index, num_transfer, **kw):
                spy.shapes.append((tuple(logits.shape), kw.get("allowed")))
                return policy(logits, x, mask_index, num_transfer, **kw)

        out = Spy.__new__(Spy)
        out.__dict__.update(policy.__dict__)
        return out


def test_the_sampler_sees_the_current_block_only():
    # Only the current block can commit, so the policy gets its columns alone: with a
    # large vocabulary the float64 work over the whole generation would dominate a step.
    pipe = tiny_mdm_pipeline()
    spy = BlockSpy()
    kw = dict(input_ids=PROMPTS, gen_length=16, block_length=8, steps=8)
    base = pipe(**kw).sequences
    with decodekit.attach(pipe, [spy]):
        out = pipe(**kw).sequences
    assert torch.equal(out, base)
    assert spy.shapes and all(shape == (3, 8, VOCAB) for shape, _ in spy.shapes)
    assert all(allowed is None for _, allowed in spy.shapes)


def test_dream_schedule_counts():
    n = torch.tensor([10])
    assert dream_transfer_counts(n, 4, 5, 1e-3).tolist() == [10]
    t = torch.linspace(1, 1e-3, 6, dtype=torch.float64)
    assert dream_transfer_counts(n, 0, 5, 1e-3).tolist() == [int(10 * (1 - t[1] / t[0]))]
    pipe = tiny_mdm_pipeline()
    out = pipe(input_ids=PROMPTS, gen_length=8, block_length=8, steps=4, schedule="dream")
    assert not (out.sequences == MASK).any() and out.nfe == 4


def test_cfg_matches_formula_on_first_step():
    pipe = tiny_mdm_pipeline()
    seen = {}

    class Spy(Strategy):
        name = "spy"
        loops = ("masked-diffusion",)

        @hookimpl
        def decodekit_mdm_forward(
            self,
            run,
            step,
            block_step,
            model,
            x,
            attention_mask,
            position_ids,
            mask_index,
            need_logits,
        ):
            if step == 0:
                seen["x"] = x.clone()
            return None

    with decodekit.attach(pipe, [Spy()]):
        pipe(input_ids=[[5, 6, 7]], gen_length=4, block_length=4, steps=4, cfg_scale=2.0)
    x = seen["x"]
    assert x.shape[0] == 2
    assert (x[1, :3] == MASK).all() and torch.equal(x[0, :3], torch.tensor([5, 6, 7]))


def test_bad_inputs_are_explained():
    pipe = tiny_mdm_pipeline()
    with pytest.raises(ValueError, match="multiple of block_length"):
        pipe(input_ids=PROMPTS, gen_length=10, block_length=4, steps=4)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        pipe(input_ids=PROMPTS, gen_length=8, block_length=4, steps=3)
    with pytest.raises(ValueError, match="left padding"):
        pipe(
            input_ids=torch.tensor([[5, 6]]),
            attention_mask=torch.tensor([[1, 0]]),
            gen_length=4,
            block_length=4,
            steps=4,
        )
    with pytest.raises(ValueError, match="mask_token_id"):
        MaskedDiffusionLMPipeline(tiny_bidirectional_llama())
    with pytest.raises(decodekit.ConfigError, match="unknown remasking policy"):
        pipe(input_ids=PROMPTS, gen_length=4, block_length=4, steps=4, remasking="nope")
