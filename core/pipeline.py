"""The pipeline-adapter contract: how decodekit attaches to one family of pipelines.

An adapter knows one loop shape. It installs the hooks that make the loop call
decodekit's runtime hooks, restores the user's objects exactly on detach, and,
for YAML runs and ``decodekit bench``, loads models, runs inputs, saves outputs
and compares outputs with a baseline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**63 - 1
MAX_PROMPTS = 1024
"""At most this many prompts in one config; more is almost surely a mistake (and memory)."""


class Inputs(BaseModel):
    """Base of an adapter's YAML ``inputs`` model; unknown keys are errors.

    Subclasses declare every input's type and range, so that ``decodekit
    validate`` refuses what the pipeline would fail on after loading the model.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    seed: int = Field(0, ge=0, le=MAX_SEED, description="random seed, 0 <= seed <= 2**63-1")


def check_prompts(value: str | list[str], *, empty_ok: bool = True) -> str | list[str]:
    """A field validator's check of ``prompt``: a non-empty list of at most `MAX_PROMPTS`."""
    rows = [value] if isinstance(value, str) else value
    if not rows:
        raise ValueError("the prompt list is empty; give at least one prompt")
    if len(rows) > MAX_PROMPTS:
        raise ValueError(f"{len(rows)} prompts; at most {MAX_PROMPTS} in one config")
    if not empty_ok and any(not r for r in rows):
        raise ValueError("a prompt is empty; a language model needs at least one prompt token")
    return value


def short_repr(value: Any, limit: int = 60) -> str:
    """A repr of ``value`` bounded in length and in work (never formats a whole large value)."""
    import reprlib

    bounded = reprlib.Repr()  # keyword arguments only from Python 3.12
    bounded.maxlevel, bounded.maxstring, bounded.maxother, bounded.maxlong = 3, limit, limit, 40
    r = bounded.repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


class KeyValueError(ValueError):
    """A validator's error about one key inside the field it checks (``extra.top_k``).

    Raised in a field validator, the config error names ``<field>.<key>``
    instead of the whole field.
    """

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


class Options(BaseModel):
    """Base of an adapter's ``pipeline.options`` model: an allow-list, unknown keys are errors.

    ``trust_remote_code`` and ``local_files_only`` are never accepted here: remote
    code needs the CLI flag ``--trust-remote-code``, and decodekit never downloads.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class PipelineAdapter:
    """Base class of pipeline adapters.

    Attributes:
        name: registry name, as written in YAML ``pipeline.type``.
        loop: the loop shape it drives (one of `decodekit.strategy.LOOPS`).
        Inputs: the pydantic model of the YAML ``inputs`` section.
        Options: the pydantic model of ``pipeline.options`` (the load options it accepts).
        contract: the attribute names strategies may read through ``run.adapter``;
            each loop's contract class in `decodekit.loops` extends it.
        target: the object the user attached to (pipeline or model).
    """

    name: ClassVar[str] = ""
    loop: ClassVar[str] = ""
    Inputs: ClassVar[type[Inputs]] = Inputs
    Options: ClassVar[type[Options]] = Options
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

    def stats(self) -> dict[str, Any]:
        """The adapter's own figures since `attach` (e.g. time per phase of the loop), under
        ``pipeline`` in the run's stats and, medians over pairs, in a bench's result; none by
        default."""
        return {}

    # -- running from YAML and bench -----------------------------------------------
    @classmethod
    def load(cls, source: str, *, device: str, dtype: str, options: dict[str, Any]) -> Any:
        """Load the pipeline or model from a resolved local source (folder or cached hub id).

        ``options`` are ``pipeline.options``, already checked against `Options`.
        An adapter that can run a model folder's own code takes a keyword
        ``trust_remote_code``; decodekit passes it only when the user gave
        ``--trust-remote-code``.
        """
        raise NotImplementedError

    @classmethod
    def generate(cls, target: Any, inputs: Inputs, progress: bool = False) -> Any:
        """Run ``target`` on ``inputs`` (seeded) and return its outputs."""
        raise NotImplementedError

    @classmethod
    def save(cls, outputs: Any, out_dir: Path, inputs: Inputs | None = None) -> list[Path]:
        """Write outputs under ``out_dir`` (PNG images, JSONL texts); returns the files written.

        ``inputs`` (the run's, when given) name the files after their prompts.
        """
        raise NotImplementedError

    @classmethod
    def records(cls, outputs: Any, inputs: Inputs) -> list[dict[str, Any]]:
        """One row per output for ``run.json``'s ``outputs``: ``file``, ``prompt``, ``seed`` ...

        ``seed`` is the row's seed from `decodekit.seeds`. The default lists none.
        """
        return []

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
    def save(
        cls, outputs: list[dict[str, Any]], out_dir: Path, inputs: Inputs | None = None
    ) -> list[Path]:
        """``outputs.jsonl``: one row per output (``prompt``, ``text``, ``tokens``, and
        ``rank``/``score`` where the strategy returned several ranked rows per prompt)."""
        import json

        from .outputs import atomic_write_text

        out_dir.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(row) + "\n" for row in outputs)
        return [atomic_write_text(out_dir / "outputs.jsonl", text)]

    @classmethod
    def records(cls, outputs: list[dict[str, Any]], inputs: Inputs) -> list[dict[str, Any]]:
        """Per row: ``file`` (``outputs.jsonl``), ``line``, ``prompt``, its row ``seed``, and
        ``rank``/``score`` when the row has them."""
        from .seeds import row_seeds

        prompt = getattr(inputs, "prompt", None)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if not prompts or not outputs or len(outputs) % len(prompts):
            return []
        per = len(outputs) // len(prompts)
        seeds = row_seeds(inputs.seed, prompts)
        rows = []
        for i, row in enumerate(outputs):
            rec = {"file": "outputs.jsonl", "line": i, "prompt": prompts[i // per]}
            rec["seed"] = seeds[i // per]
            rec.update({k: row[k] for k in ("rank", "score") if k in row})
            rows.append(rec)
        return rows

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
