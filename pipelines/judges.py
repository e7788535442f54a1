"""Quality metrics from the reference zoo's judges, for ``decodekit bench``.

Registered through ``decodekit_register_quality_metrics`` like any plugin's:

* ``shapes-judge`` — on stable-diffusion, ar-image, var and mar outputs whose prompts are shape
  captions ("a small red circle on the left"): prompt adherence of the
  baseline and of the strategy as read by the zoo's timm classifier, how often
  the judge reads the same attributes from both, and the Fréchet distance of
  the strategy's images to the baseline's on the judge's features (from 16
  images up: below that the covariance says nothing).
* ``arith-accuracy`` — on text outputs whose prompts end in a sum or difference
  ("417+85=", or a few-shot prompt of solved problems before it,
  "012+005=0017 417+085="): exact-answer accuracy of baseline and strategy.
  Where the problem is written zero-padded (three-digit operands, as
  zoo:arith-mdlm-fewshot is prompted) the four-digit answer ("0502") counts
  as well as the plain one.
* ``vqa-accuracy`` — on vlm outputs whose inputs give ``answers`` (one reference
  answer per prompt): each row's answer is the first word (or words) of the text
  that is a reference answer of the config, or of the shapes questions' answers
  (attribute words and "describe it" captions) when every reference is one of them; the
  accuracy of baseline and strategy, how often both arms give the same answer, and
  per question kind when the prompts are the shapes questions ("what shape is it").

A metric returns None when the outputs are not its kind, so it stays silent
on other pipelines.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from decodekit.hookspecs import hookimpl

# The problem at the end of a prompt: at its start or after whitespace (solved examples).
ARITH_PROMPT = re.compile(r"(?:^|\s)(\d+)\s*([+-])\s*(\d+)\s*=\s*$")
MIN_IMAGES_FOR_FRECHET = 16
IMAGE_ADAPTERS = ("stable-diffusion", "diffusion-transformer", "ar-image", "var", "mar")
"""Adapters whose outputs are lists of PIL images, one per prompt and image."""


@lru_cache(maxsize=1)
def _judge():
    from decodekit.pipelines.zoo.shapes_judge import ShapesJudge

    return ShapesJudge.load()


def _prompts_per_image(inputs: Any, n_images: int) -> list[str] | None:
    prompt = getattr(inputs, "prompt", None)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    per = getattr(inputs, "num_images_per_prompt", 1) or 1
    expanded = [p for p in prompts for _ in range(per)]
    return expanded if len(expanded) == n_images else None


def shapes_judge_metric(
    adapter: str, baseline: Any, outputs: Any, inputs: Any
) -> dict[str, float] | None:
    """Judge adherence (baseline, strategy), judge agreement, Fréchet distance to the baseline."""
    if adapter not in IMAGE_ADAPTERS or not isinstance(outputs, list) or not outputs:
        return None
    from decodekit.pipelines.zoo.shapes_data import parse_caption

    prompts = _prompts_per_image(inputs, len(outputs))
    if prompts is None:
        return None
    if not all(parse_caption(p) is not None for p in prompts):
        classes = [_class_name(p) for p in prompts]  # class names of a class-conditional model
        return None if None in classes else _class_metric(baseline, outputs, classes)
    judge = _judge()
    base = judge.adherence(baseline, prompts)
    strat = judge.adherence(outputs, prompts)
    pred_base, pred_strat = judge.predict(baseline), judge.predict(outputs)
    result = {
        "judge_adherence_baseline": float(base["overall"]),
        "judge_adherence_strategy": float(strat["overall"]),
        "judge_shape_colour_baseline": _shape_colour(judge, baseline, prompts),
        "judge_shape_colour_strategy": _shape_colour(judge, outputs, prompts),
        "judge_agreement": sum(a == b for a, b in zip(pred_base, pred_strat)) / len(outputs),
    }
    if len(outputs) >= MIN_IMAGES_FOR_FRECHET:
        result["judge_frechet_to_baseline"] = judge.frechet(outputs, baseline)
    return result


def _class_name(prompt: str) -> tuple[str, str] | None:
    """``(shape, colour)`` of a class name such as ``"red circle"`` (VAR's shapes classes), else None."""
    from decodekit.pipelines.zoo.shapes_data import COLOURS, SHAPES

    words = prompt.strip().lower().split()
    if len(words) == 2 and words[0] in COLOURS and words[1] in SHAPES:
        return words[1], words[0]
    return None


def _class_metric(baseline: list, outputs: list, classes: list) -> dict[str, float]:
    """Shape and colour of each image against its class, both arms; their agreement; Fréchet."""
    judge = _judge()
    pred_base, pred_strat = judge.predict(baseline), judge.predict(outputs)

    def hits(preds: list) -> float:
        return sum((p["shape"], p["colour"]) == c for p, c in zip(preds, classes)) / len(classes)

    result = {
        "judge_shape_colour_baseline": hits(pred_base),
        "judge_shape_colour_strategy": hits(pred_strat),
        "judge_shape_colour_agreement": sum(
            (a["shape"], a["colour"]) == (b["shape"], b["colour"])
            for a, b in zip(pred_base, pred_strat)
        )
        / len(outputs),
    }
    if len(outputs) >= MIN_IMAGES_FOR_FRECHET:
        result["judge_frechet_to_baseline"] = judge.frechet(outputs, baseline)
    return result


def _shape_colour(judge, images, prompts) -> float:
    """Fraction of single-shape prompts whose image shows the right shape and colour."""
    from decodekit.pipelines.zoo.shapes_data import parse_caption

    hits = counted = 0
    for pred, prompt in zip(judge.predict(images), prompts):
        scene = parse_caption(prompt)
        if scene is None or len(scene.objects) != 1:
            continue
        counted += 1
        want = scene.objects[0]
        hits += pred["shape"] == want.shape and pred["colour"] == want.colour
    return hits / counted if counted else float("nan")


def arith_answer(prompt: str) -> str | None:
    """The right answer to the problem a prompt ends with (``"417+85="`` -> ``"502"``), or None."""
    forms = arith_answer_forms(prompt)
    return forms[0] if forms else None


def arith_answer_forms(prompt: str) -> tuple[str, ...]:
    """Every accepted spelling of the answer to the problem ``prompt`` ends with: the plain
    one, and for zero-padded problems (``"417+085="``, both operands three digits) also the
    four-digit one (``"0502"``); empty when the prompt does not end in a problem."""
    m = ARITH_PROMPT.search(prompt)
    if m is None:
        return ()
    a, op, b = m.group(1), m.group(2), m.group(3)
    value = int(a) + int(b) if op == "+" else int(a) - int(b)
    forms = (str(value),)
    if len(a) == len(b) == 3:
        forms += (f"{value:04d}",)
    return forms


def _first_answer(text: str) -> str:
    return text.strip().split()[0] if text.strip() else ""


def arith_accuracy_metric(
    adapter: str, baseline: Any, outputs: Any, inputs: Any
) -> dict[str, float] | None:
    """Exact-answer accuracy of baseline and strategy on arithmetic prompts.

    Each arm is scored on its own rows (a strategy may return several
    sequences per prompt); every row is matched against its own prompt.
    """

    def rows_ok(rows: Any) -> bool:
        return (
            isinstance(rows, list)
            and bool(rows)
            and all(isinstance(r, dict) and "text" in r for r in rows)
        )

    if not (rows_ok(baseline) and rows_ok(outputs)):
        return None
    if any(arith_answer(r.get("prompt", "")) is None for r in baseline + outputs):
        return None

    def accuracy(rows: list[dict[str, Any]]) -> float:
        right = sum(_first_answer(r["text"]) in arith_answer_forms(r["prompt"]) for r in rows)
        return right / len(rows)

    return {"accuracy_baseline": accuracy(baseline), "accuracy_strategy": accuracy(outputs)}


_WORDS = re.compile(r"[a-z0-9]+")


def _words(text: str) -> tuple[str, ...]:
    return tuple(_WORDS.findall(text.lower()))


def vqa_vocabulary(answers: list[str]) -> set[tuple[str, ...]]:
    """The answers a generated text is read for: the references (as word tuples), with every
    answer of the shapes questions (each attribute word, each caption) when every reference
    is one of them."""
    from decodekit.pipelines.zoo.shapes_data import COLOUR_NAMES, POSITIONS, SHAPES
    from decodekit.pipelines.zoo.shapes_vqa import answer_vocabulary, caption_answer

    refs = {_words(a) for a in answers}
    shapes = {(w,) for w in answer_vocabulary()} | {
        _words(caption_answer(c, s, p)) for c in COLOUR_NAMES for s in SHAPES for p in POSITIONS
    }
    return refs | shapes if refs <= shapes else refs


def read_answer(text: str, vocabulary: set[tuple[str, ...]]) -> tuple[str, ...] | None:
    """The first answer of ``vocabulary`` in ``text`` (the longest one starting at the first word
    that starts any), as words; None when the text names none."""
    words = _words(text)
    longest = max((len(v) for v in vocabulary), default=0)
    for i in range(len(words)):
        for n in range(min(longest, len(words) - i), 0, -1):
            if words[i : i + n] in vocabulary:
                return words[i : i + n]
    return None


def _question_kind(prompt: str) -> str | None:
    from decodekit.pipelines.zoo.shapes_vqa import QUESTIONS

    text = " ".join(w for w in prompt.split() if w != "<image>")
    return next((k for k, q in QUESTIONS.items() if q == text), None)


def vqa_accuracy_metric(
    adapter: str, baseline: Any, outputs: Any, inputs: Any
) -> dict[str, float] | None:
    """Answer accuracy of baseline and strategy against ``inputs.answers``; their agreement."""
    answers = getattr(inputs, "answers", None)
    if adapter != "vlm" or answers is None:
        return None
    from decodekit.errors import ConfigError

    for arm, rows in (("baseline", baseline), ("strategy", outputs)):
        if len(rows) != len(answers):
            raise ConfigError(
                "inputs.answers",
                f"{len(answers)} answers for the {arm}'s {len(rows)} output rows; give one "
                "reference answer per prompt (and one row per prompt)",
            )
    vocabulary = vqa_vocabulary(answers)
    refs = [_words(a) for a in answers]
    read_base = [read_answer(r["text"], vocabulary) for r in baseline]
    read_strat = [read_answer(r["text"], vocabulary) for r in outputs]

    def share(marks: list[bool]) -> float:
        return sum(marks) / len(marks)

    result = {
        "accuracy_baseline": share([a == r for a, r in zip(read_base, refs)]),
        "accuracy_strategy": share([a == r for a, r in zip(read_strat, refs)]),
        "answer_agreement": share([a == b for a, b in zip(read_base, read_strat)]),
        "count": len(refs),
    }
    kinds = [_question_kind(r.get("prompt", "")) for r in baseline]
    if None not in kinds:
        for kind in dict.fromkeys(kinds):
            rows = [i for i, k in enumerate(kinds) if k == kind]
            result[f"accuracy_{kind}_baseline"] = share([read_base[i] == refs[i] for i in rows])
            result[f"accuracy_{kind}_strategy"] = share([read_strat[i] == refs[i] for i in rows])
    return result


@hookimpl
def decodekit_register_quality_metrics(register):
    register("shapes-judge", shapes_judge_metric)
    register("arith-accuracy", arith_accuracy_metric)
    register("vqa-accuracy", vqa_accuracy_metric)
