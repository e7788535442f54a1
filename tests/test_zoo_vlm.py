"""The VLM zoo: shapes-vqa questions (splits, parsing, scoring)."""

from __future__ import annotations

import numpy as np
import pytest
from decodekit.pipelines.zoo.shapes_data import COLOUR_NAMES, POSITIONS, SHAPES
from decodekit.pipelines.zoo.shapes_vqa import (
    KINDS,
    QUESTIONS,
    SPLITS,
    accuracy,
    answer_correct,
    image_split,
    parse_answer,
    vqa_items,
    vqa_words,
)

# --- the question data ----------------------------------------------------------------------


def _key(item):
    return (item.scene, item.jitter)


def test_items_are_deterministic_and_seeds_differ():
    a, b = vqa_items(12, seed=3, split="selection"), vqa_items(12, seed=3, split="selection")
    assert [_key(x) for x in a] == [_key(x) for x in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    c = vqa_items(12, seed=4, split="selection")
    assert [_key(x) for x in a] != [_key(x) for x in c]


def test_splits_are_disjoint_by_image():
    keys = {split: {_key(it) for it in vqa_items(600, seed=0, split=split)} for split in SPLITS}
    assert not keys["train"] & keys["gate"]
    assert not keys["train"] & keys["selection"]
    assert not keys["gate"] & keys["selection"]
    for split, found in keys.items():
        assert all(image_split(*key) == split for key in found)


def test_items_are_one_shape_32px_rgb_with_cycled_kinds_and_true_answers():
    items = vqa_items(32, seed=1, split="gate")
    assert [it.kind for it in items] == [KINDS[i % 4] for i in range(32)]
    for it in items:
        assert it.image.mode == "RGB" and it.image.size == (32, 32)
        assert len(it.scene.objects) == 1 and it.question == QUESTIONS[it.kind]
        obj = it.scene.objects[0]
        expected = {
            "shape": obj.shape,
            "colour": obj.colour,
            "position": obj.position,
            "describe": f"a {obj.colour} {obj.shape} at the {obj.position}",
        }
        assert it.answer == expected[it.kind]
        assert set(it.question.split()) | set(it.answer.split()) <= set(vqa_words())


def test_the_shape_is_drawn_where_its_position_word_says():
    for it in vqa_items(60, seed=2, split="train"):
        pixels = np.asarray(it.image).astype(int)
        ink = np.abs(pixels - 245).sum(-1) > 60  # off the light grey background
        ys, xs = np.nonzero(ink)
        cx, cy = xs.mean(), ys.mean()
        pos = it.scene.objects[0].position
        if pos == "left":
            assert cx < 13
        elif pos == "right":
            assert cx > 19
        elif pos == "top":
            assert cy < 13
        elif pos == "bottom":
            assert cy > 19
        else:
            assert 12 < cx < 20 and 12 < cy < 20


def test_bad_split_or_count_is_refused():
    with pytest.raises(ValueError, match="split"):
        vqa_items(3, split="test")
    with pytest.raises(ValueError, match="count"):
        vqa_items(-1)


def test_vocabulary_holds_every_answer_and_question_word():
    words = vqa_words()
    assert words == sorted(set(words))
    assert set(SHAPES) | set(COLOUR_NAMES) | set(POSITIONS) <= set(words)
    assert {"what", "shape", "colour", "where", "is", "it", "describe", "a", "at", "the"} <= set(
        words
    )


# --- parsing and scoring --------------------------------------------------------------------


def test_the_first_answer_word_is_the_answer():
    assert parse_answer("Red.") == "red"
    assert parse_answer("it is a blue circle") == "blue"
    assert parse_answer("what is it") is None
    assert answer_correct("circle", "circle")
    assert answer_correct("  the circle on the left", "circle")
    assert not answer_correct("square circle", "circle")
    assert not answer_correct("", "circle")
    assert not answer_correct("circles", "circle")
    caption = "a red circle at the top"
    assert answer_correct(caption, caption) and answer_correct("red circle top", caption)
    assert not answer_correct("a red circle at the left", caption)
    assert not answer_correct("a red circle", caption)  # no position
    assert not answer_correct("a circle red at the top", caption)  # out of order
    assert not answer_correct("anything", "")


def test_accuracy_is_overall_and_per_kind():
    items = vqa_items(8, seed=0, split="gate")
    texts = [it.answer for it in items]
    texts[0] = "nothing"  # a shape question wrong
    texts[5] = "left" if items[5].answer != "left" else "right"  # a colour question wrong
    texts[7] = texts[7].rsplit(" ", 1)[0]  # a caption without its position: wrong
    report = accuracy(texts, items)
    assert report["overall"] == pytest.approx(5 / 8) and report["count"] == 8
    assert report["shape"] == 0.5 and report["colour"] == 0.5 and report["position"] == 1.0
    assert report["describe"] == 0.5 and report["count_shape"] == 2
    with pytest.raises(ValueError, match="one per item"):
        accuracy(texts[:2], items)


# --- the trainer: small dims, a few steps, into a temporary folder ---------------------------

SMALL = {"vision_width": 16, "vision_layers": 1, "text_width": 32, "text_layers": 2}


def test_processor_writes_bos_256_image_tokens_and_one_token_a_word():
    from decodekit.pipelines.zoo.train_shapes_vlm import (
        BOS_ID,
        IMAGE_ID,
        question_ids,
        shapes_vlm_processor,
        vocabulary,
    )

    processor = shapes_vlm_processor()
    for kind, ids in question_ids(processor).items():
        words = QUESTIONS[kind].split()
        assert ids[0] == BOS_ID and ids[1:257] == [IMAGE_ID] * 256
        assert [vocabulary()[i] for i in ids[257:]] == words
    assert question_ids(shapes_vlm_processor(patch_size=4))["shape"][1:66] == [IMAGE_ID] * 64 + [
        vocabulary().index("what")
    ]
    assert (
        processor.tokenizer.decode([vocabulary().index("circle"), 2], skip_special_tokens=True)
        == "circle"
    )


def test_shared_image_prefix_gives_the_logits_of_full_rows():
    import torch
    from decodekit.pipelines.zoo.shapes_vqa import answer_of
    from decodekit.pipelines.zoo.train_shapes_vlm import (
        EOS_ID,
        answer_ids,
        answer_logits,
        answer_loss,
        answer_targets,
        new_model,
        pixel_values,
        prompt_text,
        question_ids,
        shapes_vlm_processor,
        vocabulary,
    )

    processor, model = shapes_vlm_processor(patch_size=4), new_model(0, patch_size=4, **SMALL)
    model.eval()
    items = vqa_items(3, seed=0, split="train")
    ids = {w: i for i, w in enumerate(vocabulary())}
    answers = answer_ids(items, ids)  # (3, 4, 6)
    processor.tokenizer.padding_side = "left"
    enc = processor(
        images=[it.image for it in items for _ in KINDS],
        text=[
            f"{prompt_text(QUESTIONS[k])} {answer_of(it.scene, k)}" for it in items for k in KINDS
        ],
        return_tensors="pt",
        padding=True,
    )
    positions = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers rows
    with torch.no_grad():
        shared = answer_logits(
            model, question_ids(processor), answers, pixel_values(processor, items)
        )
        full = model(**enc, position_ids=positions).logits
    targets = answer_targets(answers)  # (12, 7)
    for r in range(len(targets)):
        n = int((targets[r] != -100).sum())  # the answer's words and </s>
        assert targets[r, n - 1] == EOS_ID and n == (7 if r % 4 == 3 else 2)
        want = enc.input_ids[r, -(n - 1) :]  # the answer as the full row writes it
        assert targets[r, : n - 1].tolist() == want.tolist()
        torch.testing.assert_close(shared[r, :n], full[r, -n:], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the loss reads the answers' positions only
        loss = answer_loss(model, question_ids(processor), answers, pixel_values(processor, items))
    by_hand = torch.nn.functional.cross_entropy(
        shared.flatten(0, 1), targets.flatten(), ignore_index=-100
    )
    torch.testing.assert_close(loss, by_hand)


def test_trainer_writes_a_folder_the_vlm_adapter_loads(tmp_path):
    import json

    from decodekit.pipelines.vlm_adapter import VLMAdapter
    from decodekit.pipelines.zoo.train_shapes_vlm import generate_answers, train_vlm

    train_vlm(
        tmp_path,
        steps=2,
        batch_size=2,
        warmup=1,
        num_images=6,
        check_every=2,
        vision_pretrain_steps=2,
        vision_pretrain_images=8,
        measure=False,
        patch_size=4,
        **SMALL,
    )
    record = json.loads((tmp_path / "training.json").read_text())
    assert (
        record["steps"] == 2
        and record["image_tokens"] == 64
        and len(record["selection_checks"]) == 1
    )
    assert record["vision_pretraining"]["steps"] == 2 and record["vision_pretraining"]["checks"]
    assert (tmp_path / "model.safetensors").is_file()
    pipe = VLMAdapter.load(str(tmp_path), device="cpu", dtype="float32", options={})
    assert pipe.model.config.text_config.num_hidden_layers == 2
    texts = generate_answers(pipe.model, pipe.processor, vqa_items(3, split="gate"))
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


# --- the committed model ------------------------------------------------------------------


def test_shapes_vlm_runs_from_a_yaml_config(tmp_path):
    from decodekit.config import load_config

    items = vqa_items(2, seed=0, split="gate")
    paths = []
    for i, it in enumerate(items):
        paths.append(str(tmp_path / f"{i}.png"))
        it.image.save(paths[-1])
    config = load_config(
        {
            "pipeline": {"type": "vlm", "model": "zoo:shapes-vlm", "device": "cpu"},
            "inputs": {
                "images": paths,
                "prompt": [it.question for it in items],
                "max_new_tokens": 2,
            },
        }
    )
    pipe = config.adapter.load(config.source, device="cpu", dtype="float32", options={})
    rows = config.adapter.generate(pipe, config.inputs)
    assert pipe.model.config.image_seq_length == 256  # 2x2-pixel patches of a 32 px render
    assert [parse_answer(r["text"]) is not None for r in rows] == [True, True]


def test_shapes_vlm_answers_the_gate_questions():
    """Greedy answers to 240 gate questions (60 a kind): at least 90% right overall."""
    from decodekit.pipelines.zoo.train_shapes_vlm import evaluate_vlm

    report = evaluate_vlm("shapes-vlm", split="gate", count=240)
    print(report)
    assert report["count"] == 240 and report["count_describe"] == 60
    assert report["overall"] >= 0.90, report
