"""The vlm pipeline under bench: reference answers and the vqa-accuracy metric, batches, the
adapter's prefill / decode split and K/V cache bytes, and the examples' question set."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import decodekit
import numpy as np
import pytest
import torch
from decodekit.errors import ConfigError
from decodekit.pipelines.judges import read_answer, vqa_accuracy_metric, vqa_vocabulary
from decodekit.pipelines.vlm_adapter import VLMAdapter, VLMInputs, VLMPipeline, cache_bytes
from decodekit.plugins.fastv import FastV
from decodekit.testing import tiny_llava
from PIL import Image

from tests.tiny import vlm_image as _image

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "vlm_example_data", ROOT / "benchmarks" / "vlm_example_data.py"
)
example_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example_data)

PROMPTS = ["what shape", "which colour is it", "where", "what shape is it the"]


def _rows(texts, prompts=None):
    prompts = prompts or ["q"] * len(texts)
    return [{"prompt": p, "text": t, "tokens": []} for p, t in zip(prompts, texts)]


# -- the metric --------------------------------------------------------------------------------
def test_vqa_accuracy_reads_the_first_vocabulary_answer_and_scores_per_kind():
    prompts = ["what shape is it", "what colour is it", "where is it", "<image> what shape is it"]
    answers = ["circle", "red", "left", "star"]
    inputs = VLMInputs(images="a.png", prompt=prompts, answers=answers)
    base = _rows(["circle", "red circle", "Left.", "a star"], prompts)
    # a colour before the shape is read as the answer (shapes_vqa's rule); no answer at all
    strat = _rows(["red circle", "red", "the top", "nothing"], prompts)
    q = vqa_accuracy_metric("vlm", base, strat, inputs)
    assert q["accuracy_baseline"] == 1.0
    assert q["accuracy_strategy"] == 0.25
    assert q["answer_agreement"] == 0.25  # only "red" == "red"
    assert q["count"] == 4
    assert q["accuracy_shape_baseline"] == 1.0 and q["accuracy_shape_strategy"] == 0.0
    assert q["accuracy_colour_strategy"] == 1.0 and q["accuracy_position_strategy"] == 0.0


def test_vqa_accuracy_reads_captions_whole():
    prompts = ["<image> describe it", "<image> describe it", "<image> what shape is it"]
    answers = ["a red circle at the top", "a blue star at the left", "star"]
    inputs = VLMInputs(images="a.png", prompt=prompts, answers=answers)
    base = _rows(["a red circle at the top", "a blue star at the left", "star"], prompts)
    # another caption (the wrong position), a caption's first words only, a caption for a shape
    strat = _rows(["a red circle at the left", "a blue star", "a green star at the top"], prompts)
    q = vqa_accuracy_metric("vlm", base, strat, inputs)
    assert q["accuracy_baseline"] == 1.0 and q["accuracy_strategy"] == 0.0
    assert q["accuracy_describe_baseline"] == 1.0 and q["answer_agreement"] == 0.0
    vocab = vqa_vocabulary(answers)
    assert read_answer("a green star at the top", vocab) == tuple("a green star at the top".split())
    assert read_answer("a blue star", vocab) == ("blue",)  # an attribute word, not a caption


def test_vqa_accuracy_generalises_to_other_answers():
    answers = ["new york", "paris", "york"]
    vocab = vqa_vocabulary(answers)
    assert vocab == {("new", "york"), ("paris",), ("york",)}  # not shapes words: references only
    assert read_answer("It is New York!", vocab) == ("new", "york")  # the longest at a word
    assert read_answer("york, not paris", vocab) == ("york",)
    assert read_answer("circle", vocab) is None
    inputs = VLMInputs(images="a.png", prompt=["a", "b", "c"], answers=answers)
    base = _rows(["new york", "paris", "new york"])
    q = vqa_accuracy_metric("vlm", base, base, inputs)
    assert q["accuracy_baseline"] == pytest.approx(2 / 3) and q["answer_agreement"] == 1.0
    assert not any(k.startswith("accuracy_shape") for k in q)  # kinds unknown: none reported


def test_vqa_accuracy_silent_elsewhere_and_refuses_a_count_mismatch():
    rows = _rows(["circle", "red"])
    with_answers = VLMInputs(images="a.png", prompt=["x", "y"], answers=["circle", "red"])
    assert vqa_accuracy_metric("causal-lm", rows, rows, with_answers) is None
    no_answers = VLMInputs(images="a.png", prompt=["x", "y"])
    assert vqa_accuracy_metric("vlm", rows, rows, no_answers) is None
    assert vqa_accuracy_metric("vlm", rows, rows, VLMInputs(images="a", prompt="x")) is None
    with pytest.raises(ConfigError, match="2 answers for the strategy's 3 output rows"):
        vqa_accuracy_metric("vlm", rows, rows + rows[:1], with_answers)


def test_inputs_answers_one_per_prompt():
    with pytest.raises(ValueError, match="3 answers for 2 prompts"):
        VLMInputs(images="a.png", prompt=["x", "y"], answers=["a", "b", "c"])
    with pytest.raises(ValueError, match="non-empty string"):
        VLMInputs(images="a.png", prompt=["x", "y"], answers=["a", " "])
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        VLMInputs(images="a.png", prompt="x", batch_size=0)


def test_yaml_answers_mismatch_is_a_config_error(tmp_path, manager):
    from decodekit.config import load_config

    folder = tmp_path / "m"
    model, processor = tiny_llava(seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    path = tmp_path / "c.yaml"
    path.write_text(
        f"pipeline: {{type: vlm, model: {folder}, device: cpu}}\n"
        "inputs: {images: a.png, prompt: [x, y], answers: [circle]}\n"
    )
    with pytest.raises(ConfigError, match="1 answers for 2 prompts"):
        load_config(path, manager=manager)


# -- batches and the adapter's figures ---------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(len(PROMPTS)):
        paths.append(str(folder / f"{i}.png"))
        _image(i).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def pipe():
    model, processor = tiny_llava(seed=3)
    return VLMPipeline(model, processor)


def _inputs(images, **kw):
    return VLMInputs(images=images, prompt=PROMPTS, max_new_tokens=3, **kw)


def test_batch_size_runs_in_batches_with_the_same_rows(pipe, images):
    whole = VLMAdapter.generate(pipe, _inputs(images))
    with decodekit.attach(pipe, []) as run:
        batched = VLMAdapter.generate(pipe, _inputs(images, batch_size=3))
        figures = run.stats["pipeline"]
    assert figures["generate_calls"] == 2  # 3 + 1 rows
    assert figures["prefill_forwards"] == 2
    assert [r["prompt"] for r in batched] == PROMPTS
    assert [r["image"] for r in batched] == images
    alone = [
        VLMAdapter.generate(pipe, VLMInputs(images=p, prompt=q, max_new_tokens=3))[0]
        for p, q in zip(images, PROMPTS)
    ]
    assert [r["tokens"] for r in batched] == [r["tokens"] for r in alone]
    assert [r["tokens"] for r in whole] == [r["tokens"] for r in alone]


def _expected_cache(model, rows, length, layers_len):
    cfg = model.config.text_config
    head = cfg.hidden_size // cfg.num_attention_heads
    per_position = 2 * rows * cfg.num_key_value_heads * head * 4  # K and V, float32
    return sum(per_position * n for n in layers_len(length, cfg.num_hidden_layers))


def test_adapter_splits_prefill_and_decode_and_counts_the_cache(pipe, images):
    model, processor = pipe.model, pipe.processor
    enc = processor(images=[_image(0), _image(1)], text=["<image> " + p for p in PROMPTS[:2]])
    L = max(len(ids) for ids in enc["input_ids"])  # padded prompt length
    n = sum(t == 4 for t in enc["input_ids"][0])  # image tokens per row
    inputs = VLMInputs(images=images[:2], prompt=PROMPTS[:2], max_new_tokens=4, do_sample=False)
    gen = {"min_new_tokens": 4}
    inputs = inputs.model_copy(update={"extra": gen})
    with decodekit.attach(pipe, []) as run:
        VLMAdapter.generate(pipe, inputs)
        base = run.stats["pipeline"]
    assert base["prefill_forwards"] == 1 and base["decode_forwards"] == 3
    assert base["prefill_s"] > 0 and base["decode_s"] > 0
    # the cache at the end holds the prompt and every token but the last one, in every layer
    full = _expected_cache(model, 2, L + 3, lambda length, layers: [length] * layers)
    assert base["kv_cache_bytes"] == full and base["kv_cache_bytes_per_row"] == full / 2
    k = 2
    with decodekit.attach(pipe, [FastV(layer=k, keep_ratio=0.5)]) as run:
        VLMAdapter.generate(pipe, inputs)
        pruned = run.stats["pipeline"]
    kept = L - n + n // 2 + 3  # layers >= K: text, half the image tokens, the decoded tokens
    want = _expected_cache(model, 2, L + 3, lambda length, layers: [length] * k + [kept] * 2)
    assert pruned["kv_cache_bytes"] == want < full


def test_cache_bytes_of_nothing_and_of_a_legacy_tuple():
    assert cache_bytes(None) == (0, 0)
    kv = torch.zeros(3, 2, 5, 4)
    assert cache_bytes(((kv, kv), (kv, kv))) == (4 * kv.numel() * 4, 3)


def test_bench_reports_phases_cache_and_answers(tmp_path, pipe, images, manager):
    from decodekit.bench import bench
    from decodekit.cli import format_bench
    from decodekit.config import load_config

    folder = tmp_path / "m"
    pipe.model.save_pretrained(folder)
    pipe.processor.save_pretrained(folder)
    path = tmp_path / "c.yaml"
    path.write_text(
        f"pipeline: {{type: vlm, model: {folder}, device: cpu}}\n"
        "strategies: [{name: fastv, params: {layer: 2, keep_ratio: 0.25}}]\n"
        f"inputs: {{images: {images}, prompt: {PROMPTS}, answers: [circle, red, left, star],"
        " max_new_tokens: 2, batch_size: 2}\n"
        "bench: {warmup: 0, repeat: 1}\n"
    )
    r = bench(load_config(path, manager=manager), manager=manager, progress=False)
    figures = r["pipeline"]
    assert figures["baseline"]["generate_calls"] == figures["strategy"]["generate_calls"] == 2
    assert figures["ratio"]["kv_cache_bytes"] > 1  # the pruned layers hold fewer positions
    assert set(r["quality"]["vqa-accuracy"]) >= {"accuracy_baseline", "accuracy_strategy"}
    assert r["baseline"]["stats"]["strategies"] == {}
    assert r["strategy"]["stats"]["strategies"]["fastv"]["prefill_flops_ratio"] < 1
    text = format_bench(r)
    assert "prefill" in text and "K/V cache" in text and "vqa-accuracy" in text


# -- the examples' question set ---------------------------------------------------------------
def test_committed_question_images_are_the_generators():
    items = example_data.example_items()
    assert len(items) == 96
    kinds = ("shape", "colour", "position", "describe")
    assert [sum(it.kind == k for it in items) for k in kinds] == [24] * 4
    for i, item in enumerate(items):
        with Image.open(ROOT / example_data.image_path(i)) as im:
            assert im.size == (32, 32)
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(item.image)), i
    files = sorted((ROOT / example_data.DATA).glob("*.png"))
    assert len(files) == len(items)  # no stray images


def test_examples_on_the_question_set_hold_its_inputs(manager):
    from decodekit.config import load_config

    want = example_data.example_inputs()
    users = [
        p
        for p in sorted((ROOT / "examples").glob("*.yaml"))
        if str(example_data.DATA) in p.read_text()
    ]
    for path in users:
        cfg = load_config(path, manager=manager)
        assert cfg.inputs.images == want["images"], path.name
        assert cfg.inputs.prompt == want["prompt"], path.name
        assert cfg.inputs.answers == want["answers"], path.name
