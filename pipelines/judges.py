"""Quality metrics from the reference zoo's judges, for ``decodekit bench``.

Registered through ``decodekit_register_quality_metrics`` like any plugin's:

* ``shapes-judge`` — on stable-diffusion outputs whose prompts are shape
  captions ("a small red circle on the left"): prompt adherence of the
  baseline and of the strategy as read by the zoo's timm classifier, how often
  the judge reads the same attributes from both, and the Fréchet distance of
  the strategy's images to the baseline's on the judge's features (from 16
  images up: below that the covariance says nothing).
* ``arith-accuracy`` — on text outputs whose prompts are sums or differences
  ("417+85="): exact-answer accuracy of baseline and strategy.

A metric returns None when the outputs are not its kind, so it stays silent
on other pipelines.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from decodekit.hookspecs import hookimpl

ARITH_PROMPT = re.compile(r"^\s*(\d+)\s*([+-])\s*(\d+)\s*=\s*$")
MIN_IMAGES_FOR_FRECHET = 16


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
    if adapter != "stable-diffusion" or not isinstance(outputs, list) or not outputs:
        return None
    from decodekit.pipelines.zoo.shapes_data import parse_caption

    prompts = _prompts_per_image(inputs, len(outputs))
    if prompts is None or any(parse_caption(p) is None for p in prompts):
        return None
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
    """The right answer to an arithmetic prompt such as ``"417+85="``, or None."""
    m = ARITH_PROMPT.match(prompt)
    if m is None:
        return None
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return str(a + b if op == "+" else a - b)


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
        return sum(_first_answer(r["text"]) == arith_answer(r["prompt"]) for r in rows) / len(rows)

    return {"accuracy_baseline": accuracy(baseline), "accuracy_strategy": accuracy(outputs)}


@hookimpl
def decodekit_register_quality_metrics(register):
    register("shapes-judge", shapes_judge_metric)
    register("arith-accuracy", arith_accuracy_metric)
