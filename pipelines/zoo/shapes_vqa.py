"""Visual questions about `shapes` renders: "what shape is it", "what colour is it",
"where is it" and "describe it".

Each item is a one-shape scene (two shapes would make "what colour is it" ambiguous)
rendered at 32x32 with a small jitter and one question about it. The first three kinds
(`ATTRIBUTES`) are answered by one word (of `SHAPES`, `COLOUR_NAMES` or `POSITIONS`);
"describe it" by a six-word caption, "a red circle at the top", whose three attribute
words carry the answer and whose other three ("a", "at", "the") are fixed filler. The
question kinds cycle shape, colour, position, describe, so any ``count`` divisible by 4
is balanced.

The splits are disjoint by image: a rendered image is a scene and a jitter on a
0.25-pixel grid, and a stable hash of that pair puts it in ``gate`` (1 in 20),
``selection`` (1 in 20) or ``train`` (the rest). Gates are measured on ``gate``,
operating points chosen on ``selection``, and training sees neither.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from decodekit.pipelines.zoo.shapes_data import (
    COLOUR_NAMES,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeObject,
    ShapeScene,
    render_scene,
)
from PIL import Image

ATTRIBUTES = ("shape", "colour", "position")
"""The kinds answered by one word (the attribute the word names)."""
KINDS = (*ATTRIBUTES, "describe")
QUESTIONS = {
    "shape": "what shape is it",
    "colour": "what colour is it",
    "position": "where is it",
    "describe": "describe it",
}
"""The question of each kind."""
SPLITS = ("train", "selection", "gate")
JITTER_STEPS = tuple(i * 0.25 for i in range(-6, 7))
"""Jitter offsets in pixels (-1.5 to 1.5 by 0.25), per axis."""
_ANSWER_WORDS = {"shape": SHAPES, "colour": COLOUR_NAMES, "position": POSITIONS}
_HASH_BUCKETS = 20  # bucket 0 -> gate, 1 -> selection, the rest -> train


@dataclass(frozen=True)
class VQAItem:
    """One question about one render.

    Attributes:
        image: the 32x32 RGB render.
        question: the question text, e.g. "what shape is it".
        answer: the answer, e.g. "circle", or "a red circle at the top" to "describe it".
        kind: "shape", "colour", "position" or "describe".
        scene: the one-shape `ShapeScene` the image shows.
        jitter: the (dx, dy) pixel offset the shape was drawn with.
    """

    image: Image.Image
    question: str
    answer: str
    kind: str
    scene: ShapeScene
    jitter: tuple[float, float] = (0.0, 0.0)


def image_split(scene: ShapeScene, jitter: tuple[float, float]) -> str:
    """The split ("train", "selection" or "gate") that the render of `scene` at `jitter` is in."""
    obj = scene.objects[0]
    key = f"{obj.shape}|{obj.colour}|{obj.position}|{obj.size}|{jitter[0]:.2f}|{jitter[1]:.2f}"
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % _HASH_BUCKETS
    return SPLITS[2] if bucket == 0 else SPLITS[1] if bucket == 1 else SPLITS[0]


def answer_of(scene: ShapeScene, kind: str) -> str:
    """The answer to the question of `kind` about the one-shape `scene`."""
    obj = scene.objects[0]
    if kind == "describe":
        return caption_answer(obj.colour, obj.shape, obj.position)
    return {"shape": obj.shape, "colour": obj.colour, "position": obj.position}[kind]


def caption_answer(colour: str, shape: str, position: str) -> str:
    """The answer to "describe it": "a <colour> <shape> at the <position>"."""
    return f"a {colour} {shape} at the {position}"


def vqa_items(count: int, seed: int = 0, split: str = "train") -> list[VQAItem]:
    """`count` questions on renders of `split`, deterministic by (`seed`, `split`).

    Item i asks the question of kind ``KINDS[i % 4]``; scenes (shape, colour, position,
    size) are uniform, jitter uniform on the 0.25-pixel grid.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    rng = random.Random(f"shapes-vqa:{split}:{seed}")
    items = []
    while len(items) < count:
        obj = ShapeObject(
            rng.choice(SHAPES), rng.choice(COLOUR_NAMES), rng.choice(POSITIONS), rng.choice(SIZES)
        )
        scene = ShapeScene((obj,))
        jitter = (rng.choice(JITTER_STEPS), rng.choice(JITTER_STEPS))
        if image_split(scene, jitter) != split:
            continue
        kind = KINDS[len(items) % len(KINDS)]
        items.append(
            VQAItem(
                image=render_scene(scene, (jitter,)),
                question=QUESTIONS[kind],
                answer=answer_of(scene, kind),
                kind=kind,
                scene=scene,
                jitter=jitter,
            )
        )
    return items


def answer_vocabulary() -> tuple[str, ...]:
    """Every attribute word: shapes, colours and positions."""
    return (*SHAPES, *COLOUR_NAMES, *POSITIONS)


def vqa_words() -> list[str]:
    """Every word of the questions and answers, sorted (the tokenizer's word list)."""
    words = set(answer_vocabulary()) | set(caption_answer("", "", "").split())
    for question in QUESTIONS.values():
        words |= set(question.split())
    return sorted(words)


def attribute_words(text: str) -> list[str]:
    """The attribute words of `text` in order (case and punctuation ignored)."""
    vocabulary = set(answer_vocabulary())
    return [w for w in re.findall(r"[a-z]+", text.lower()) if w in vocabulary]


def parse_answer(text: str) -> str | None:
    """The first attribute word in `text`, or None."""
    words = attribute_words(text)
    return words[0] if words else None


def answer_correct(text: str, answer: str) -> bool:
    """Whether the generated `text` names `answer`'s attribute words first, in order.

    A one-word answer is right when it is the first attribute word of `text`; a caption
    when its colour, shape and position are the first three (the filler words are not read).
    """
    wanted = attribute_words(answer)
    return bool(wanted) and attribute_words(text)[: len(wanted)] == wanted


def accuracy(texts: Sequence[str], items: Sequence[VQAItem]) -> dict[str, Any]:
    """Share of correct answers, overall and per kind, with the counts.

    Returns ``{"overall": float, "shape": float, "colour": float, "position": float,
    "count": int, "count_<kind>": int}`` (a kind with no items is left out).
    """
    if len(texts) != len(items):
        raise ValueError(f"{len(texts)} answers for {len(items)} items; give one per item")
    if not items:
        raise ValueError("no items to score")
    right = [answer_correct(t, it.answer) for t, it in zip(texts, items)]
    report: dict[str, Any] = {"overall": sum(right) / len(right), "count": len(right)}
    for kind in KINDS:
        marks = [r for r, it in zip(right, items) if it.kind == kind]
        if marks:
            report[kind] = sum(marks) / len(marks)
            report[f"count_{kind}"] = len(marks)
    return report
