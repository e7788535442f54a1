"""diverse-beam: group beam search with Hamming diversity, inside transformers 5's generate."""

from __future__ import annotations

import decodekit
import pytest
import torch
from decodekit.testing import StrategyTesterMixin, tiny_llama
from transformers import SuppressTokensLogitsProcessor

PROMPTS = [[1, 5, 6, 7], [1, 9, 3, 4], [1, 30, 31, 8]]
# A token the tiny random model picks often: used as EOS so that hypotheses finish early.
EOS_OFTEN = 18
# transformers 5 fills finished beams with `pad_token_id or eos`, so a pad id of 0 reads as
# "no pad"; a non-zero pad id makes its output comparable with transformers 4.55's.
PAD = 63


def dbs(groups: int, penalty: float, **params):
    return {
        "name": "diverse-beam",
        "params": {"num_beam_groups": groups, "diversity_penalty": penalty, **params},
    }


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(dtype=torch.float64)


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(cfg).to(torch.float64).eval()


def beam(model, rows, **kw):
    kw.setdefault("pad_token_id", PAD)
    return model.generate(
        torch.tensor(rows),
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        **kw,
    )


@pytest.mark.parametrize("eos", [None, EOS_OFTEN])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_one_group_equals_transformers_beam_search(llama, eos, length_penalty):
    kw = dict(max_new_tokens=8, num_beams=4, num_return_sequences=4, length_penalty=length_penalty)
    if eos is not None:
        kw["eos_token_id"] = eos
    base = beam(llama, PROMPTS, **kw)
    with decodekit.attach(llama, [dbs(1, 0.7)]) as run:
        out = beam(llama, PROMPTS, **kw)
    assert torch.equal(out.sequences, base.sequences)
    torch.testing.assert_close(out.sequences_scores, base.sequences_scores, rtol=0, atol=1e-5)
    if eos is not None:  # the oracle covered hypotheses that finished before max length
        assert (base.sequences[:, 4:] == eos).any()
    assert run.last["nfe"] == len(out.scores)  # one forward per step, all beams together


def test_zero_penalty_is_independent_beam_searches(llama):
    # 2 groups of 2 beams, no penalty: each group is a beam search with 2 beams,
    # so every hypothesis of generate(num_beams=2) comes back twice.
    kw = dict(max_new_tokens=7, eos_token_id=EOS_OFTEN)
    base = beam(llama, PROMPTS, num_beams=2, num_return_sequences=2, **kw)
    with decodekit.attach(llama, [dbs(2, 0.0)]):
        out = beam(llama, PROMPTS, num_beams=4, num_return_sequences=4, **kw)
    width = max(base.sequences.shape[1], out.sequences.shape[1])

    def padded(s):
        return torch.nn.functional.pad(s, (0, width - s.shape[1]), value=PAD)

    want = padded(base.sequences).view(len(PROMPTS), 2, 1, -1).expand(-1, -1, 2, -1)
    got = padded(out.sequences).view(len(PROMPTS), 2, 2, -1)
    assert torch.equal(got, want)
    want_scores = base.sequences_scores.view(-1, 2, 1).expand(-1, -1, 2)
    torch.testing.assert_close(out.sequences_scores.view(-1, 2, 2), want_scores, rtol=0, atol=1e-5)


def first_tokens(model, groups, penalty, new_tokens, beams=6):
    with decodekit.attach(model, [dbs(groups, penalty)]):
        out = beam(
            model,
            PROMPTS[:1],
            max_new_tokens=new_tokens,
            num_beams=beams,
            num_return_sequences=beams,
        )
    return set(out.sequences[:, 4].tolist())


def test_large_penalty_makes_groups_start_differently(llama):
    # After one step, a huge penalty forbids group g the tokens of groups < g: 3 groups of 2
    # beams hold 6 different tokens; with no penalty the groups are copies (2 tokens).
    assert len(first_tokens(llama, 3, 1e4, 1)) == 6
    assert len(first_tokens(llama, 3, 0.0, 1)) == 2
    # Later a group may drop one of its branches, but groups never share a first token.
    assert len(first_tokens(llama, 3, 1e4, 5)) >= 3
    assert len(first_tokens(llama, 3, 0.0, 5)) <= 2


def test_hamming_penalty_formula(llama):
    """Group 1's processed scores are group 0's minus penalty × count of group 0's tokens."""
    with decodekit.attach(llama, [dbs(2, 0.25)]):
        out = beam(llama, PROMPTS[:1], max_new_tokens=1, num_beams=4, num_return_sequences=4)
    step = out.scores[0]  # (4, V) processed log-probs of beams (g0: 0, 1; g1: 2, 3)
    logits = llama(torch.tensor(PROMPTS[:1])).logits[0, -1].float()
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(step[0], logp, rtol=0, atol=1e-6)
    g0_tokens = torch.topk(logp, 2).indices  # group 0 takes its best two tokens
    want = logp.clone()
    want[g0_tokens] -= 0.25
    torch.testing.assert_close(step[2], want, rtol=0, atol=1e-6)


def test_batch_equals_one_by_one_with_eos(llama):
    kw = dict(max_new_tokens=6, num_beams=4, num_return_sequences=2, eos_token_id=EOS_OFTEN)
    with decodekit.attach(llama, [dbs(2, 1.0)]):
        batch = beam(llama, PROMPTS, **kw)
        alone = [beam(llama, [p], **kw) for p in PROMPTS]
    for i, a in enumerate(alone):
        rows = batch.sequences[2 * i : 2 * i + 2]
        assert torch.equal(rows[:, : a.sequences.shape[1]], a.sequences)
        assert (rows[:, a.sequences.shape[1] :] == PAD).all()
        torch.testing.assert_close(batch.sequences_scores[2 * i : 2 * i + 2], a.sequences_scores)


def Ban(token: int):
    """A user's logits processor that bans one token (transformers' own)."""
    return SuppressTokensLogitsProcessor([token])


def test_composes_with_logits_processors(llama):
    from transformers import LogitsProcessorList

    kw = dict(max_new_tokens=6, num_beams=4, num_return_sequences=4)
    with decodekit.attach(llama, [dbs(2, 0.5)]):
        free = beam(llama, PROMPTS[:1], **kw)
        banned = int(free.sequences[0, 4])
        out = beam(llama, PROMPTS[:1], logits_processor=LogitsProcessorList([Ban(banned)]), **kw)
        rep = beam(llama, PROMPTS[:1], no_repeat_ngram_size=1, **kw)
    assert banned not in out.sequences[:, 4:].tolist()[0]
    assert not torch.equal(out.sequences, free.sequences)
    for row in rep.sequences[:, 4:].tolist():  # transformers' own processor from the config
        assert len(set(row)) == len(row)


def test_params_fill_generate_arguments(llama):
    with decodekit.attach(llama, [dbs(2, 0.5, num_beams=4, max_new_tokens=3)]):
        out = llama.generate(torch.tensor(PROMPTS[:1]), pad_token_id=0)
        assert out.shape == (1, 7)
        with pytest.raises(decodekit.ConfigError, match="num_beams"):
            llama.generate(torch.tensor(PROMPTS[:1]), pad_token_id=0, num_beams=6)


def test_bad_group_count_is_a_clear_error(llama):
    with decodekit.attach(llama, [dbs(3, 0.5)]):
        with pytest.raises(decodekit.ConfigError, match="multiple of num_beam_groups"):
            beam(llama, PROMPTS[:1], max_new_tokens=2, num_beams=4)
    with decodekit.attach(llama, [dbs(2, 0.5)]):
        with pytest.raises(decodekit.ConfigError, match="num_beams >= 2"):
            beam(llama, PROMPTS[:1], max_new_tokens=2)


def test_sampling_within_groups_is_seeded(llama):
    kw = dict(max_new_tokens=5, num_beams=4, num_return_sequences=4, do_sample=True)
    with decodekit.attach(llama, [dbs(2, 0.5)]):
        torch.manual_seed(1)
        a = llama.generate(torch.tensor(PROMPTS[:1]), pad_token_id=0, **kw)
        torch.manual_seed(1)
        b = llama.generate(torch.tensor(PROMPTS[:1]), pad_token_id=0, **kw)
        greedy = beam(llama, PROMPTS[:1], max_new_tokens=5, num_beams=4, num_return_sequences=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, greedy.sequences)


def test_encoder_decoder_t5():
    t5 = tiny_t5()
    src = [[5, 6, 7, 8, 1], [9, 10, 11, 3, 1]]
    kw = dict(max_new_tokens=6, num_beams=4, num_return_sequences=4)
    base = beam(t5, src, **kw)
    with decodekit.attach(t5, [dbs(1, 0.5)]):
        one = beam(t5, src, **kw)
    with decodekit.attach(t5, [dbs(2, 1e4)]):
        two = beam(t5, src, max_new_tokens=1, num_beams=4, num_return_sequences=4)
    assert torch.equal(one.sequences, base.sequences)
    torch.testing.assert_close(one.sequences_scores, base.sequences_scores, rtol=0, atol=1e-5)
    assert type(one).__name__ == "GenerateBeamEncoderDecoderOutput"
    for i in range(2):  # after one step, two groups of two beams hold four different tokens
        assert len(set(two.sequences[4 * i : 4 * i + 4, 1].tolist())) == 4


def test_cache_without_reorder_is_refused(llama):
    from decodekit.plugins.diverse_beam import reorder_model_cache

    class Frozen:
        pass

    with pytest.raises(decodekit.AttachError, match="reorder"):
        reorder_model_cache(torch.nn.Linear(1, 1), {"cache": Frozen()}, torch.tensor([0]))


def test_no_cache_matches_cache(llama):
    kw = dict(max_new_tokens=5, num_beams=4, num_return_sequences=4)
    with decodekit.attach(llama, [dbs(2, 0.5)]):
        a = beam(llama, PROMPTS[:1], **kw)
        b = beam(llama, PROMPTS[:1], use_cache=False, **kw)
    assert torch.equal(a.sequences, b.sequences)


class TestDiverseBeamContract(StrategyTesterMixin):
    atol = 0

    @property
    def strategies(self):
        return [dbs(2, 0.5)]

    def make_pipeline(self):
        return tiny_llama(dtype=torch.float64)

    def sample_inputs(self):
        return PROMPTS

    def run_pipeline(self, pipe, inputs, seed, row_offset=0):
        torch.manual_seed(seed)
        out = pipe.generate(
            torch.tensor(inputs),
            max_new_tokens=5,
            num_beams=4,
            num_return_sequences=2,
            pad_token_id=0,
            eos_token_id=EOS_OFTEN,
        )
        return torch.nn.functional.pad(out, (0, 9 - out.shape[1]), value=0)

    def broken_call(self, pipe):
        pipe.generate(torch.tensor([[1, 200]]), max_new_tokens=2, num_beams=4, pad_token_id=0)


@pytest.mark.parametrize(("key", "given"), [("num_beam_groups", 4), ("diversity_penalty", 5.0)])
def test_generate_group_arguments_different_from_params_are_an_error(llama, key, given):
    kw = dict(max_new_tokens=4, num_beams=4)
    with decodekit.attach(llama, [dbs(2, 0.5)]) as run:
        with pytest.raises(decodekit.ConfigError, match=rf"{key}.*0?\.?[25].*{key}={given}") as e:
            beam(llama, PROMPTS, **kw, **{key: given})
        assert f"params.{key}" in e.value.path
    assert not run.attached


def test_generate_group_arguments_equal_to_params_work(llama):
    kw = dict(max_new_tokens=4, num_beams=4, num_return_sequences=2)
    with decodekit.attach(llama, [dbs(2, 0.5)]):
        plain = beam(llama, PROMPTS, **kw)
        same = beam(llama, PROMPTS, **kw, num_beam_groups=2, diversity_penalty=0.5)
    assert torch.equal(plain.sequences, same.sequences)
