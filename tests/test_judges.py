"""The zoo's quality metrics for bench: shape-judge adherence and arithmetic accuracy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from decodekit.pipelines.judges import (
    arith_accuracy_metric,
    arith_answer,
    arith_answer_forms,
    shapes_judge_metric,
)

PROMPTS = [
    "a small red circle on the left",
    "a large blue square at the top",
    "a small green star in the centre",
]


def renders(prompts):
    from decodekit.pipelines.zoo.shapes_data import parse_caption, render_scene

    return [render_scene(parse_caption(p)) for p in prompts]


def test_arith_answer():
    assert arith_answer("417+85=") == "502"
    assert arith_answer("12-30=") == "-18"
    assert arith_answer("the cat") is None
    assert arith_answer("417+85=0502") is None  # solved, nothing left to answer


def test_arith_answer_after_few_shot_context_and_zero_padding():
    from decodekit.pipelines.zoo.arith_data import held_out_few_shot

    assert arith_answer("12+5=17 417-85=") == "332"
    assert arith_answer_forms("417+85=") == ("502",)
    assert arith_answer_forms("012+005=0017 417+085=") == ("502", "0502")
    assert arith_answer_forms("003-021=") == ("-18", "-018")
    for prompt, answer in held_out_few_shot(20, 8, padded=True):
        assert answer in arith_answer_forms(prompt)
    for prompt, answer in held_out_few_shot(20, 8):
        assert arith_answer(prompt) == answer


def test_arith_accuracy_scores_zero_padded_answers():
    prompt = "012+005=0017 417+085="
    rows = [{"prompt": prompt, "text": t} for t in ("0502", "502 ", "0503", "")]
    figures = arith_accuracy_metric("masked-diffusion-lm", rows, rows[:1], None)
    assert figures == {"accuracy_baseline": 0.5, "accuracy_strategy": 1.0}


def test_arith_accuracy_counts_first_answer_token():
    inputs = SimpleNamespace(prompt=["1+1=", "5-3="])
    base = [{"prompt": "1+1=", "text": "2"}, {"prompt": "5-3=", "text": "2 and more"}]
    strat = [{"prompt": "1+1=", "text": "3"}, {"prompt": "5-3=", "text": " 2"}]
    assert arith_accuracy_metric("causal-lm", base, strat, inputs) == {
        "accuracy_baseline": 1.0,
        "accuracy_strategy": 0.5,
    }
    other = [{"prompt": "the cat", "text": "sat"}]
    assert arith_accuracy_metric("causal-lm", other, other, inputs) is None


@pytest.mark.skipif(
    not __import__("importlib.util").util.find_spec("decodekit.pipelines.zoo.shapes_judge"),
    reason="the zoo judge is not in this build",
)
def test_shapes_judge_reads_real_renders():
    images = renders(PROMPTS)
    swapped = renders(PROMPTS[1:] + PROMPTS[:1])  # every image now shows another prompt's scene
    inputs = SimpleNamespace(prompt=PROMPTS, num_images_per_prompt=1)
    same = shapes_judge_metric("stable-diffusion", images, images, inputs)
    assert same["judge_adherence_baseline"] == 1.0 and same["judge_agreement"] == 1.0
    diff = shapes_judge_metric("stable-diffusion", images, swapped, inputs)
    assert diff["judge_adherence_strategy"] == 0.0 and diff["judge_agreement"] == 0.0
    assert "judge_frechet_to_baseline" not in diff  # too few images for a covariance
    assert shapes_judge_metric("ar-image", images, swapped, inputs) == diff
    assert shapes_judge_metric("diffusion-transformer", images, swapped, inputs) == diff


def test_shapes_judge_silent_elsewhere():
    inputs = SimpleNamespace(prompt=["a photo of a cat"], num_images_per_prompt=1)
    assert shapes_judge_metric("stable-diffusion", [None], [None], inputs) is None
    assert shapes_judge_metric("causal-lm", [{"text": "x"}], [{"text": "x"}], inputs) is None


def test_metrics_ignore_tensor_outputs():
    import torch

    inputs = SimpleNamespace(prompt=["1+1="], num_images_per_prompt=1)
    out = torch.zeros(2, 3)
    assert arith_accuracy_metric("toy", out, out, inputs) is None
    assert shapes_judge_metric("stable-diffusion", out, out, inputs) is None


def test_arith_accuracy_scores_each_arm_on_its_own_rows():
    inputs = SimpleNamespace(prompt=["1+1="])
    base = [{"prompt": "1+1=", "text": "2"}]
    strat = [{"prompt": "1+1=", "text": t} for t in ("2", "3", "2", "4")]  # 4 drafts for one prompt
    assert arith_accuracy_metric("causal-lm", base, strat, inputs) == {
        "accuracy_baseline": 1.0,
        "accuracy_strategy": 0.5,
    }


@pytest.mark.skipif(
    not __import__("importlib.util").util.find_spec("decodekit.pipelines.zoo.shapes_judge"),
    reason="the zoo judge is not in this build",
)
def test_shapes_judge_reads_class_names_of_a_class_conditional_model():
    # var's prompts are class names ("red circle"): shape and colour are judged, not the rest
    images = renders(PROMPTS)
    classes = ["red circle", "blue square", "green star"]
    inputs = SimpleNamespace(prompt=classes, num_images_per_prompt=1)
    same = shapes_judge_metric("var", images, images, inputs)
    assert same["judge_shape_colour_baseline"] == 1.0
    assert same["judge_shape_colour_agreement"] == 1.0
    swapped = shapes_judge_metric("var", images, images[1:] + images[:1], inputs)
    assert swapped["judge_shape_colour_strategy"] == 0.0
    assert swapped["judge_shape_colour_agreement"] == 0.0
    assert "judge_adherence_baseline" not in swapped  # position and size are not in a class
    ids = SimpleNamespace(prompt=["class 3", "class 4", "class 5"], num_images_per_prompt=1)
    assert shapes_judge_metric("var", images, images, ids) is None
