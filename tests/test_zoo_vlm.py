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
    items = vqa_items(30, seed=1, split="gate")
    assert [it.kind for it in items] == [KINDS[i % 3] for i in range(30)]
    for it in items:
        assert it.image.mode == "RGB" and it.image.size == (32, 32)
        assert len(it.scene.objects) == 1 and it.question == QUESTIONS[it.kind]
        obj = it.scene.objects[0]
        expected = {"shape": obj.shape, "colour": obj.colour, "position": obj.position}
        assert it.answer == expected[it.kind]
        assert set(it.question.split()) <= set(vqa_words()) and it.answer in vqa_words()


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
    assert {"what", "shape", "colour", "where", "is", "it"} <= set(words)


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


def test_accuracy_is_overall_and_per_kind():
    items = vqa_items(6, seed=0, split="gate")
    texts = [it.answer for it in items]
    texts[0] = "nothing"  # a shape question wrong
    texts[4] = "left" if items[4].answer != "left" else "right"  # a colour question wrong
    report = accuracy(texts, items)
    assert report["overall"] == pytest.approx(4 / 6) and report["count"] == 6
    assert report["shape"] == 0.5 and report["colour"] == 0.5 and report["position"] == 1.0
    assert report["count_shape"] == 2
    with pytest.raises(ValueError, match="one per item"):
        accuracy(texts[:2], items)
