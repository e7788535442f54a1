"""A prompt samples the same output in any list (issue 22): seeds follow the prompt, not its index.

Each adapter's YAML ``generate`` seeds every row from ``inputs.seed``, the
prompt's text and its occurrence among identical prompts (`decodekit.seeds`);
causal-lm rows never carry pad tokens, so batched rows equal the rows alone.
"""

from __future__ import annotations

import numpy as np
import pytest
from decodekit.pipelines.zoo import zoo_path
from decodekit.seeds import row_seed, row_seeds


def test_row_seeds_follow_the_prompt():
    a = row_seeds(0, ["x", "y", "x"])
    b = row_seeds(0, ["y", "x", "z", "x"])
    assert a[0] == b[1] and a[1] == b[0] and a[2] == b[3]  # same prompt, same occurrence
    assert a[0] != a[2]  # a repeated prompt gets a fresh sample
    assert row_seeds(1, ["x"]) != row_seeds(0, ["x"])
    assert all(0 <= s < 2**63 for s in a + b)
    # SHA-256, not Python's salted hash: the same number in every process and on every machine
    assert row_seed(0, "x") == 6174693991578111898
    assert row_seeds(0, ["x", "y"], per_prompt=2)[1] == row_seed(0, "x", 0, 1)


SHAPES = ["a small red circle on the left", "a large green square on the right", "a star"]


@pytest.fixture(scope="module")
def shapes_sd():
    from decodekit.pipelines.stable_diffusion import StableDiffusionAdapter

    return StableDiffusionAdapter.load(
        str(zoo_path("shapes-sd")), device="cpu", dtype="float32", options={"scheduler": "ddim"}
    )


def sd_images(pipe, prompts, **kw):
    from decodekit.pipelines.stable_diffusion import StableDiffusionAdapter, StableDiffusionInputs

    inputs = StableDiffusionInputs(
        prompt=prompts, num_inference_steps=3, guidance_scale=3.0, seed=5, **kw
    )
    return [np.asarray(im, dtype=np.int16) for im in StableDiffusionAdapter.generate(pipe, inputs)]


def close(a, b) -> bool:
    # a batch mate may move a float32 sum by one ulp; the seed decides everything else
    return np.abs(a - b).max() <= 2


def test_stable_diffusion_image_follows_its_prompt(shapes_sd):
    a = sd_images(shapes_sd, [SHAPES[0], SHAPES[1]])
    b = sd_images(shapes_sd, [SHAPES[2], SHAPES[0], SHAPES[0]])
    alone = sd_images(shapes_sd, SHAPES[0])
    assert close(a[0], b[1]) and close(a[0], alone[0])
    assert not close(b[1], b[2])  # the second copy of the prompt is another sample
    two = sd_images(shapes_sd, [SHAPES[1], SHAPES[0]], num_images_per_prompt=2)
    assert close(two[2], a[0]) and not close(two[2], two[3])  # image k of a prompt: its own seed


def test_masked_diffusion_sample_follows_its_prompt():
    from decodekit.pipelines.masked_diffusion_adapter import (
        MaskedDiffusionInputs,
        MaskedDiffusionLMAdapter,
    )

    pipe = MaskedDiffusionLMAdapter.load(
        str(zoo_path("arith-mdlm")), device="cpu", dtype="float32", options={}
    )

    def tokens(prompts, **kw):
        inputs = MaskedDiffusionInputs(
            prompt=prompts, gen_length=16, block_length=16, steps=16, temperature=1.0, seed=2, **kw
        )
        return {r["prompt"]: r["tokens"] for r in MaskedDiffusionLMAdapter.generate(pipe, inputs)}

    first = tokens(["8+5=", "9+1="])
    assert first["8+5="] == tokens(["7-3=", "8+5="])["8+5="]
    assert first["8+5="] == tokens(["6+2=", "4+4=", "8+5="], batch_size=2)["8+5="]


@pytest.fixture(scope="module")
def arith_ar():
    from decodekit.pipelines.causal_lm import CausalLMAdapter

    return CausalLMAdapter.load(
        str(zoo_path("arith-ar")), device="cpu", dtype="float32", options={}
    )


def causal_rows(pipe, prompts, **kw):
    from decodekit.pipelines.causal_lm import CausalLMAdapter, CausalLMInputs

    return CausalLMAdapter.generate(pipe, CausalLMInputs(prompt=prompts, seed=4, **kw))


def test_causal_lm_sample_follows_its_prompt(arith_ar):
    kw = {"max_new_tokens": 12, "do_sample": True, "extra": {"temperature": 1.5}}
    a = causal_rows(arith_ar, ["86-7=", "8+5="], **kw)
    b = causal_rows(arith_ar, ["8+5=", "97-47=", "86-7="], **kw)
    assert a[0]["tokens"] == b[2]["tokens"] and a[1]["tokens"] == b[0]["tokens"]


@pytest.mark.parametrize("do_sample", [False, True])
def test_causal_lm_tokens_carry_no_pads(arith_ar, do_sample):
    """Batched rows equal the rows alone: no left pad of the prompt, no pad after the end."""
    prompts = ["172-9=", "8+5=", "0+60=", "109-93="]
    kw = {"max_new_tokens": 16, "do_sample": do_sample}
    batched = causal_rows(arith_ar, prompts, **kw)
    alone = [causal_rows(arith_ar, [p], **kw)[0] for p in prompts]
    assert [r["tokens"] for r in batched] == [r["tokens"] for r in alone]
    tokenizer = arith_ar.tokenizer
    eos = tokenizer.eos_token_id
    for r in batched:
        assert eos not in r["tokens"][:-1]  # nothing after the end of the answer
    assert any(len(r["tokens"]) < 16 for r in batched)  # some rows ended early: pads were cut
    if tokenizer.pad_token_id != eos:
        assert all(tokenizer.pad_token_id not in r["tokens"] for r in batched)
