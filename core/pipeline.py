"""The pipeline-adapter contract: how decodekit attaches to one family of pipelines.

An adapter knows one loop shape. It installs the hooks that make the loop call
decodekit's runtime hooks, restores the user's objects exactly on detach, and,
for YAML runs and ``decodekit bench``, loads models, runs inputs, saves outputs
and compares outputs with a baseline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class Inputs(BaseModel):
    """Base of an adapter's YAML ``inputs`` model; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    seed: int = 0


class PipelineAdapter:
    """Base class of pipeline adapters.

    Attributes:
        name: registry name, as written in YAML ``pipeline.type``.
        loop: the loop shape it drives (one of `decodekit.strategy.LOOPS`).
        Inputs: the pydantic model of the YAML ``inputs`` section.
        contract: the attribute names strategies may read through ``run.adapter``;
            each loop's contract class in `decodekit.loops` extends it.
        target: the object the user attached to (pipeline or model).
    """

    name: ClassVar[str] = ""
    loop: ClassVar[str] = ""
    Inputs: ClassVar[type[Inputs]] = Inputs
    description: ClassVar[str] = ""
    contract: ClassVar[tuple[str, ...]] = ("name", "loop", "target")

    def __init__(self, target: Any, run):
        self.target = target
        self.run = run

    # -- attaching -----------------------------------------------------------------
    @classmethod
    def matches(cls, obj: Any) -> bool:
        """Whether this adapter can attach to ``obj``."""
        return False

    def touched(self) -> list[Any]:
        """Every object this adapter modifies while attached (to refuse a second attach)."""
        return [self.target]

    def attach(self) -> None:
        """Install hooks. Must leave the target untouched when it raises."""
        raise NotImplementedError

    def detach(self) -> None:
        """Remove every hook and restore the target exactly as it was."""
        raise NotImplementedError

    # -- running from YAML and bench -----------------------------------------------
    @classmethod
    def load(cls, source: str, *, device: str, dtype: str, options: dict[str, Any]) -> Any:
        """Load the pipeline or model from a resolved local source (folder or cached hub id)."""
        raise NotImplementedError

    @classmethod
    def generate(cls, target: Any, inputs: Inputs, progress: bool = False) -> Any:
        """Run ``target`` on ``inputs`` (seeded) and return its outputs."""
        raise NotImplementedError

    @classmethod
    def save(cls, outputs: Any, out_dir: Path) -> list[Path]:
        """Write outputs under ``out_dir`` (PNG images, JSONL texts); returns the files written."""
        raise NotImplementedError

    @classmethod
    def quality(cls, baseline: Any, outputs: Any) -> dict[str, float]:
        """Figures comparing ``outputs`` to the ``baseline`` outputs of the same inputs."""
        return {}

    @classmethod
    def picture(cls, baseline: Any, outputs: Any, path: Path) -> bool:
        """Write a side-by-side PNG of baseline and strategy outputs; False if there is none to draw."""
        return False


class TextAdapter(PipelineAdapter):
    """Base of adapters whose outputs are text rows ``{"prompt", "text", "tokens"}``.

    Saves them as JSONL and compares them with the baseline by token agreement
    and exact match. When the strategy returned k rows per prompt (drafts,
    beams) and the baseline one, each baseline row is compared with the first,
    best-ranked, row of its prompt.
    """

    @classmethod
    def save(cls, outputs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
        import json

        from .outputs import atomic_write_text

        out_dir.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(row) + "\n" for row in outputs)
        return [atomic_write_text(out_dir / "outputs.jsonl", text)]

    @classmethod
    def quality(
        cls, baseline: list[dict[str, Any]], outputs: list[dict[str, Any]]
    ) -> dict[str, float]:
        if len(outputs) != len(baseline) and baseline and len(outputs) % len(baseline) == 0:
            outputs = outputs[:: len(outputs) // len(baseline)]
        return {
            "token_agreement": token_agreement(
                [b["tokens"] for b in baseline], [o["tokens"] for o in outputs]
            ),
            "exact_match": sum(b["text"] == o["text"] for b, o in zip(baseline, outputs))
            / max(1, len(baseline)),
        }


def token_agreement(baseline: list[list[int]], outputs: list[list[int]]) -> float:
    """Fraction of baseline token positions where the strategy produced the same token."""
    same = total = 0
    for b, o in zip(baseline, outputs):
        total += len(b)
        same += sum(x == y for x, y in zip(b, o))
    return same / total if total else 1.0
