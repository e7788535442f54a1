"""The causal-lm adapter: custom_generate loops, logits processors, model-input hooks, exact restore."""

from __future__ import annotations

import decodekit
import pytest
import torch
from decodekit import Strategy, hookimpl
from decodekit.testing import StrategyTesterMixin, assert_restored, fingerprint, tiny_llama
from transformers import SuppressTokensLogitsProcessor

PROMPTS = [[1, 5, 6, 7], [1, 9, 3, 4]]


class GreedyLoop(Strategy):
    """Drives decoding itself: plain greedy without a cache (what transformers' greedy computes)."""

    name = "greedy-loop"
    loops = ("token-autoregression",)
    slot = "proposer"

    @hookimpl
    def decodekit_generate(
        self,
        run,
        model,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        model_kwargs,
    ):
        for _ in range(generation_config.max_new_tokens):
            scores = logits_processor(input_ids, model(input_ids).logits[:, -1])  # (B, V)
            input_ids = torch.cat([input_ids, scores.argmax(-1, keepdim=True)], dim=1)
        return input_ids


def BanToken(token: int):
    """A user's logits processor that bans one token (transformers' own)."""
    return SuppressTokensLogitsProcessor([token])


class Ban(Strategy):
    name = "ban"
    loops = ("token-autoregression",)

    @hookimpl
    def decodekit_logits_processors(self, run, generation_config):
        return [BanToken(self.banned)]


class CountInputs(Strategy):
    name = "count-inputs"
    loops = ("token-autoregression",)

    def reset(self, run):
        self.steps = []

    @hookimpl
    def decodekit_model_inputs(self, run, step, model_inputs):
        self.steps.append((step, model_inputs["input_ids"].shape[1]))


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def gen(model, rows=PROMPTS, n=6, **kw):
    return model.generate(
        torch.tensor(rows), max_new_tokens=n, do_sample=False, pad_token_id=0, **kw
    )


def test_custom_loop_equals_transformers_greedy(model):
    base = gen(model)
    with decodekit.attach(model, [GreedyLoop()]) as run:
        out = gen(model)
    assert torch.equal(base, out)
    assert run.stats["nfe"] == 6  # the loop's forwards are counted by the pre-hook


def test_logits_processor_appended(model):
    base = gen(model, rows=PROMPTS[:1])
    ban = Ban()
    ban.banned = int(base[0, 4])
    with decodekit.attach(model, [ban]):
        out = gen(model, rows=PROMPTS[:1])
    assert ban.banned not in out[0, 4:].tolist()
    assert torch.equal(gen(model, rows=PROMPTS[:1]), base)


def test_model_inputs_hook_sees_each_forward(model):
    c = CountInputs()
    with decodekit.attach(model, [c]):
        gen(model, rows=PROMPTS[:1], n=4)
    assert [s for s, _ in c.steps] == [0, 1, 2, 3]
    assert [length for _, length in c.steps] == [
        4,
        1,
        1,
        1,
    ]  # prefill, then one token per step with the cache


def test_user_custom_generate_conflicts_with_loop_strategy(model):
    before = fingerprint(model)
    run = decodekit.attach(model, [GreedyLoop()])
    with pytest.raises(decodekit.AttachError, match="custom_generate"):
        gen(model, custom_generate=lambda *a, **k: None)
    run.detach()
    assert_restored(before, fingerprint(model))


def test_attach_to_text_generation_pipeline(model):
    from decodekit.testing import tiny_text_encoder
    from transformers import pipeline

    _, tok = tiny_text_encoder()
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    with decodekit.attach(pipe, [CountInputs()]) as run:
        pipe.model.generate(torch.tensor(PROMPTS[:1]), max_new_tokens=2, do_sample=False)
        with pytest.raises(decodekit.AttachError, match="already"):
            decodekit.attach(model, [])
    assert run.stats["nfe"] == 2


def test_non_generating_object_refused():
    with pytest.raises(decodekit.AttachError, match="no pipeline adapter"):
        decodekit.attach(torch.nn.Linear(2, 2), [])


class TestGreedyLoopContract(StrategyTesterMixin):
    atol = 0

    @property
    def strategies(self):
        return [GreedyLoop()]

    def make_pipeline(self):
        return tiny_llama(dtype=torch.float64)

    def sample_inputs(self):
        return PROMPTS

    def run_pipeline(self, pipe, inputs, seed, row_offset=0):
        torch.manual_seed(seed)
        return gen(pipe, rows=inputs)

    def broken_call(self, pipe):
        gen(pipe, rows=[[1, 200]])  # token id outside the vocabulary


def test_yaml_generate_maps_returned_sequences_to_their_prompt():
    from decodekit.pipelines.causal_lm import CausalLMAdapter, CausalLMInputs
    from decodekit.pipelines.zoo import zoo_path

    pipe = CausalLMAdapter.load(
        str(zoo_path("arith-ar")), device="cpu", dtype="float32", options={}
    )
    inputs = CausalLMInputs(
        prompt=["1+1=", "20+22="],
        max_new_tokens=3,
        extra={"num_beams": 2, "num_return_sequences": 2},
    )
    rows = CausalLMAdapter.generate(pipe, inputs)
    assert [r["prompt"] for r in rows] == ["1+1=", "1+1=", "20+22=", "20+22="]


def test_quality_compares_first_of_k_rows_per_prompt():
    from decodekit.pipelines.causal_lm import CausalLMAdapter

    base = [{"text": "2", "tokens": [5]}, {"text": "4", "tokens": [7]}]
    # Two drafts per prompt, best first: only the first draft of each prompt is compared.
    drafts = [{"text": t, "tokens": [i]} for t, i in (("2", 5), ("3", 6), ("4", 7), ("5", 8))]
    assert CausalLMAdapter.quality(base, drafts) == {"token_agreement": 1.0, "exact_match": 1.0}
    drafts = [{"text": t, "tokens": [i]} for t, i in (("2", 5), ("4", 7), ("9", 9), ("4", 7))]
    assert CausalLMAdapter.quality(base, drafts) == {"token_agreement": 0.5, "exact_match": 0.5}


class SeeCall(Strategy):
    """Records what a strategy sees of a generate call: call_kwargs and the processors' inputs."""

    name = "see-call"
    loops = ("token-autoregression",)

    @hookimpl
    def decodekit_call_start(self, run, call_kwargs):
        self.call_kwargs = dict(call_kwargs)

    @hookimpl
    def decodekit_logits_processors(self, run, generation_config, input_ids):
        self.input_ids = input_ids
        self.generation_config = generation_config


@pytest.mark.parametrize("positional", [True, False])
def test_call_kwargs_and_processors_hook_get_positional_inputs(model, positional):
    ids = torch.tensor(PROMPTS)
    base = gen(model)
    see = SeeCall()
    with decodekit.attach(model, [see]):
        if positional:
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        else:
            out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, base)  # binding the arguments changes nothing in the output
    assert see.call_kwargs["input_ids"] is ids and "inputs" not in see.call_kwargs
    assert see.call_kwargs["max_new_tokens"] == 6
    assert see.input_ids is ids and see.generation_config is None


def test_positional_generation_config_is_named(model):
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0)
    ids = torch.tensor(PROMPTS)
    see = SeeCall()
    with decodekit.attach(model, [see]):
        out = model.generate(ids, cfg)
    assert out.shape == (2, 4 + 3)
    assert see.call_kwargs["generation_config"] is cfg and see.generation_config is cfg
    assert see.input_ids is ids


def test_processors_hook_without_input_ids_still_works(model):
    ban = Ban()  # takes (run, generation_config) only: a subset of the hook's arguments
    ban.banned = 3
    with decodekit.attach(model, [ban]):
        out = model.generate(torch.tensor(PROMPTS[:1]), max_new_tokens=4, do_sample=False)
    assert 3 not in out[0, 4:].tolist()
