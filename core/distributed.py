"""Runs over several processes (``accelerate launch``, ``torchrun``), and runs that resume.

`decodekit run` and `decodekit bench` use the processes they were started in:
one, or the N that ``accelerate launch --num_processes N`` / ``torchrun
--nproc_per_node N`` start (the environment variable ``WORLD_SIZE`` says so).
Each process takes a contiguous shard of the prompt list (accelerate's
``PartialState.split_between_processes``), loads its own pipeline on its own
device (``cuda`` becomes ``cuda:<local rank>``) and attaches the strategies to
it. Row seeds follow the prompt, not its place (`decodekit.seeds`), so a
prompt's output is the same in any shard.

A run writes its outputs unit by unit (one batch of prompts at a time, see
`Job`): a prompt whose outputs are all in the folder is done. Images go
straight to their final names (written beside them and renamed in place);
outputs that share one file (``outputs.jsonl``) are kept per batch in the
hidden folder ``.decodekit-parts`` and joined, in prompt order, when every
prompt is done. A rerun of the same command in the same folder generates only
the prompts not done; ``run.json`` records the config's `fingerprint` from the
start, so a rerun with another config or library version is refused instead
of mixing outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .outputs import (
    PARTS,
    RUN_RECORD,
    TEMP_MARK,
    atomic_write_bytes,
    listed,
    output_records,
    prepare_output_dir,
    save_outputs,
    write_run_record,
)

__all__ = [
    "Job",
    "World",
    "bench_across",
    "check_placement",
    "devices_of",
    "fingerprint",
    "launched",
    "prompt_list",
    "slice_inputs",
    "world_for",
]

JOINABLE = (".jsonl", ".txt")
"""Suffixes of shared output files that batches can be joined into by concatenation."""


# -- the processes ---------------------------------------------------------------------


def launched() -> bool:
    """Whether this process is one of several (``WORLD_SIZE`` > 1, set by torchrun / accelerate)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


class World:
    """The processes of one command: ``rank`` of ``size``; one process unless launched as several.

    Args:
        state: accelerate's ``PartialState`` of a multi-process launch (None: one process).
    """

    def __init__(self, state: Any = None):
        self.state = state
        self.rank = int(state.process_index) if state is not None else 0
        self.size = int(state.num_processes) if state is not None else 1
        self.local_rank = int(state.local_process_index) if state is not None else 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prepares the folder, writes run.json and prints."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process got here."""
        if self.size > 1:
            self.state.wait_for_everyone()

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order, on every process (sent as JSON text)."""
        from .bench import jsonable

        text = json.dumps(jsonable(value))
        if self.size == 1:
            return [json.loads(text)]
        from accelerate.utils import gather_object

        return [json.loads(t) for t in gather_object([text])]

    def shard(self, count: int) -> range:
        """This process's contiguous share of ``count`` prompts (``split_between_processes``)."""
        if self.size == 1:
            return range(count)
        with self.state.split_between_processes(list(range(count))) as mine:
            return range(mine[0], mine[-1] + 1) if len(mine) else range(0)

    def device(self, device: str, gpus: int | None = None) -> str:
        """``cuda`` becomes this process's own GPU, ``cuda:<local rank>``; others stay.

        Raises `ConfigError` when the machine has fewer GPUs (``gpus``, default
        torch's count) than processes on it.
        """
        if self.size == 1 or device != "cuda":
            return device
        if gpus is None:
            import torch

            gpus = torch.cuda.device_count()
        if self.local_rank >= gpus:
            raise ConfigError(
                "pipeline.device",
                f"process {self.rank} would run on cuda:{self.local_rank}, but this machine has "
                f"{gpus} GPU(s); start at most one process per GPU (--num_processes / "
                "--nproc_per_node)",
            )
        return f"cuda:{self.local_rank}"


def world_for(device: str) -> World:
    """The `World` of this command: accelerate's state when launched as several processes.

    ``device`` picks the backend: NCCL for ``cuda``, gloo for the CPU.
    """
    if not launched():
        return World()
    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        raise ConfigError(
            "WORLD_SIZE",
            "this process is one of several (torchrun / accelerate launch) but accelerate is "
            "not installed; pip install accelerate",
        ) from None
    return World(PartialState(cpu=not str(device).startswith("cuda")))


# -- prompts -------------------------------------------------------------------------------


def prompt_list(inputs: Any) -> list[Any]:
    """The prompts of ``inputs`` as a list (one prompt, a string or a class id, is a list of one)."""
    prompt = getattr(inputs, "prompt", None)
    if isinstance(prompt, (list, tuple)):
        return list(prompt)
    return [] if prompt is None else [prompt]


def slice_inputs(inputs: Any, first: int, stop: int) -> Any:
    """``inputs`` with prompts ``first:stop``; list inputs as long as the prompts are cut with them."""
    prompts = getattr(inputs, "prompt", None)
    if not isinstance(prompts, (list, tuple)):
        return inputs  # a single prompt: the only slice is itself
    update: dict[str, Any] = {"prompt": list(prompts[first:stop])}
    for name, value in inputs:
        if name != "prompt" and isinstance(value, list) and len(value) == len(prompts):
            update[name] = value[first:stop]
    return inputs.model_copy(update=update)


def _rows_per_prompt(inputs: Any) -> int:
    return int(getattr(inputs, "num_images_per_prompt", 1) or 1)


def output_names(adapter: Any, inputs: Any) -> list[list[str]] | None:
    """Each prompt's own output files (the adapter's `records` names), or None when they share one.

    None means the outputs go to a file shared by all prompts (``outputs.jsonl``)
    or the adapter names none; such runs keep their batches in ``.decodekit-parts``.
    """
    count, per = len(prompt_list(inputs)), _rows_per_prompt(inputs)
    records = getattr(adapter, "records", None)
    if records is None or not count:
        return None
    try:
        files = [r.get("file") for r in records([{} for _ in range(count * per)], inputs)]
    except Exception:
        return None
    if len(files) != count * per or not all(files) or len(set(files)) != len(files):
        return None
    return [files[i * per : (i + 1) * per] for i in range(count)]


def _runs(indices: list[int], size: int) -> list[tuple[int, int]]:
    """Sorted indices as ``(first, stop)`` ranges of consecutive ones, each at most ``size`` long."""
    units: list[tuple[int, int]] = []
    for i in indices:
        if units and units[-1][1] == i and i - units[-1][0] < size:
            units[-1] = (units[-1][0], i + 1)
        else:
            units.append((i, i + 1))
    return units


# -- what a run is -------------------------------------------------------------------------


def fingerprint(summary: dict[str, Any], versions: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the run that started the folder.

    The pipeline section (device type only: ``cuda:1`` and ``cuda:0`` are alike),
    the strategies, the inputs (prompts and seed included) and the library
    versions; not the output folder, the bench section or the config's path.
    """
    pipeline = dict(summary.get("pipeline") or {})
    pipeline["resolved_device"] = str(pipeline.get("resolved_device", "")).split(":")[0]
    return {
        "pipeline": pipeline,
        "strategies": summary.get("strategies"),
        "inputs": summary.get("inputs"),
        "versions": versions,
    }


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted paths where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [] if old == new else [path or "(all)"]


def _read_record(out: Path) -> dict[str, Any] | None:
    record = out / RUN_RECORD
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- a run ----------------------------------------------------------------------------


class Job:
    """One ``decodekit run``: the folder, the prompts of this process, and run.json.

    `prepare` (before the model loads) checks the folder: empty or new, or
    holding a run with the same `fingerprint` (resumed: only the prompts not
    done are generated), or cleared by ``overwrite``. `generate` makes this
    process's prompts batch by batch, saving each batch before the next;
    `finish` gathers every process's stats, joins shared output files and
    writes ``run.json`` (rank 0).

    Args:
        cfg: the loaded `RunConfig` (its device is this process's own).
        world: the processes (`world_for`).
        overwrite: clear the previous run in the folder first.
        batch_size: prompts per pipeline call (default ``inputs.batch_size``, else the whole shard).
        progress: a bar on stderr (None: on rank 0, when stderr is a terminal).
        label: the config's name on the bar.
        stream: where the bar and the resume line go (default ``sys.stderr``).
    """

    def __init__(
        self,
        cfg: Any,
        world: World | None = None,
        *,
        overwrite: bool = False,
        batch_size: int | None = None,
        progress: bool | None = None,
        label: str = "run",
        stream: Any = None,
    ):
        from .cli import _versions

        self.cfg = cfg
        self.world = world or World()
        self.overwrite = overwrite
        self.batch_size = batch_size
        self.progress = progress
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.out = Path(cfg.output.dir)
        self.prompts = prompt_list(cfg.inputs)
        self.names = output_names(cfg.adapter, cfg.inputs)
        self.versions = _versions()
        self.fingerprint = fingerprint(cfg.summary(), self.versions)
        self.existed = self.out.exists()
        self.resumed = False
        self.finished = False
        self.kept: set[str] = set()
        self.done_before = 0
        self.generated = 0
        self.timings: dict[str, float] = {"generate_s": 0.0, "save_s": 0.0}

    # -- the folder ------------------------------------------------------------------
    def prepare(self) -> None:
        """Check the folder (rank 0 clears or tidies it, and writes a first run.json), then agree.

        Raises `ConfigError` (``output.dir``) on every process when the folder
        holds other files, or a run of another config, and ``overwrite`` is off.
        """
        outcome: dict[str, Any] = {}
        if self.world.is_main:
            try:
                outcome["finished"] = self._prepare_folder()
            except ConfigError as e:
                outcome["problem"] = [e.path, e.message]
        shared = self.world.gather(outcome)[0]  # also the barrier: the folder is ready
        if shared.get("problem"):
            raise ConfigError(*shared["problem"])
        self.finished = bool(shared.get("finished"))
        if self.finished:
            if self.world.is_main:
                print(
                    f"nothing to do: all {len(self.prompts)} outputs of this config are in "
                    f"{str(self.out)!r} (run.json says complete); pass --overwrite to make them again",
                    file=self.stream,
                )
            return
        previous = _read_record(self.out) or {}
        self.resumed = bool(previous.get("resuming"))
        self.kept = set(previous.get("kept", []))
        done = self.done()
        self.done_before = len(done)
        if self.resumed and self.world.is_main:
            print(
                f"resuming: {len(done)} of {len(self.prompts)} outputs exist, generating the rest",
                file=self.stream,
            )

    def _prepare_folder(self) -> bool:
        """Rank 0's part of `prepare`; True when the folder holds this config's complete run."""
        out = self.out
        previous = _read_record(out) if out.is_dir() else None
        resuming = False
        if previous is not None and not self.overwrite and "fingerprint" in previous:
            diffs = _differences(previous["fingerprint"], self.fingerprint)
            if diffs:
                raise ConfigError(
                    "output.dir",
                    f"{str(out)!r} holds the outputs of a run with another config or library "
                    f"versions (differs in {listed(diffs, 4)}); pass --overwrite to replace them, or choose "
                    "another folder",
                )
            if previous.get("status") == "complete":
                return True
            resuming = True
            _remove_stale(out)
            ours = set(previous.get("files", [])) | set(previous.get("planned", []))
            kept = {
                p.name
                for p in out.iterdir()
                if p.name not in ours and p.name not in (RUN_RECORD, PARTS)
            }
        else:
            prepare_output_dir(out, overwrite=self.overwrite)
            kept = {p.name for p in out.iterdir()}  # files decodekit did not write stay untouched
        planned = [n for names in self.names or [] for n in names]
        self._write_record(
            "running",
            {"resuming": resuming, "kept": sorted(kept), "planned": planned, "files": []},
        )
        return False

    def done(self) -> set[int]:
        """Indices of the prompts whose outputs are all in the folder (or in a kept batch)."""
        if self.names is not None:
            return {
                i
                for i, names in enumerate(self.names)
                if all((self.out / n).is_file() for n in names)
            }
        return {i for first, stop in self._parts() for i in range(first, stop)}

    def _parts(self) -> list[tuple[int, int]]:
        """The saved batches in ``.decodekit-parts`` that do not overlap, in prompt order."""
        folder = self.out / PARTS
        found = []
        if folder.is_dir():
            for p in folder.iterdir():
                first, _, stop = p.name.partition("-")
                if p.is_dir() and first.isdigit() and stop.isdigit():
                    found.append((int(first), int(stop)))
        chosen: list[tuple[int, int]] = []
        for first, stop in sorted(found, key=lambda r: (r[0], -r[1])):
            if not chosen or first >= chosen[-1][1]:
                chosen.append((first, stop))
        return chosen

    # -- generating --------------------------------------------------------------------
    def units(self) -> list[tuple[int, int]]:
        """The batches this process still has to make: its shard's prompts not done, in runs."""
        shard = self.world.shard(len(self.prompts))
        done = self.done()
        todo = [i for i in shard if i not in done]
        size = self.batch_size or getattr(self.cfg.inputs, "batch_size", None) or len(shard) or 1
        return _runs(todo, size)

    def generate(
        self, target: Any, run: Any, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        """Generate and save this process's batches not done yet, one after the other."""
        from .progress import Bar, prompt_label

        units = self.units()
        enabled = self.progress
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = self.world.is_main and bool(isatty and isatty())
        count = sum(stop - first for first, stop in units)
        label = self.label if self.world.size == 1 else f"{self.label} · rank {self.world.rank}"
        per_prompt: list[float] = []  # seconds per prompt of each batch
        tail = ""
        with Bar(count, enabled and len(units) > 1, self.stream) as bar:
            for first, stop in units:
                n = stop - first
                bar.show(prompt_label(label, bar.done + 1, bar.done + n, count) + tail)
                t0 = clock()
                self._unit(target, first, stop, progress=enabled and len(units) == 1, clock=clock)
                per_prompt.append((clock() - t0) / n)
                # the first batch carries one-time costs: out of the rate once a later one is timed
                seconds = statistics.fmean(per_prompt[1:] or per_prompt)
                tail = f" · {1 / max(seconds, 1e-9):.2f} prompts/s{_counters(run)}"
                bar.advance(n, eta=seconds * (count - bar.done - n))

    def _unit(
        self, target: Any, first: int, stop: int, progress: bool, clock: Callable[[], float]
    ) -> None:
        from .seeds import earlier_copies

        adapter, inputs = self.cfg.adapter, slice_inputs(self.cfg.inputs, first, stop)
        t0 = clock()
        with earlier_copies(self.prompts[:first]):
            outputs = adapter.generate(target, inputs, progress=progress)
        t1 = clock()
        self.timings["generate_s"] += t1 - t0
        stage = self.out / f".{first:06d}-{stop:06d}{TEMP_MARK}rank{self.world.rank}"
        if self.names is None:
            stage = self.out / PARTS / stage.name
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        try:
            if self.names is None:  # the whole batch appears at once, under its final name
                save_outputs(adapter, outputs, stage, inputs)
                final = self.out / PARTS / f"{first:06d}-{stop:06d}"
                shutil.rmtree(final, ignore_errors=True)
                os.replace(stage, final)
            else:
                renamed = self._renamed(outputs, inputs, stage, first, stop)
                try:
                    save_outputs(adapter, outputs, renamed, inputs)
                finally:  # what the adapter wrote by path rather than by name, interrupted or not
                    renamed.place()
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        self.timings["save_s"] += clock() - t1
        self.generated += stop - first

    def _renamed(self, outputs: Any, inputs: Any, stage: Path, first: int, stop: int) -> _Renamed:
        """The folder the batch is saved to: its files (named within the batch) get run-wide names."""
        local = [r.get("file") for r in self.cfg.adapter.records(outputs, inputs)]
        final = [n for names in (self.names or [])[first:stop] for n in names]
        if len(local) != len(final) or not all(local):
            raise ConfigError(
                "inputs",
                f"the {self.cfg.adapter.name!r} pipeline returned {len(local)} outputs for "
                f"{stop - first} prompts where {len(final)} were expected",
            )
        return _Renamed(stage, self.out, dict(zip(map(str, local), final)))

    # -- the record ----------------------------------------------------------------------
    def finish(self, run: Any, load_s: float = 0.0) -> dict[str, Any] | None:
        """Gather every process's stats; rank 0 joins shared files and writes run.json (returned)."""
        mine = {
            "rank": self.world.rank,
            "prompts": len(self.world.shard(len(self.prompts))),
            "generated": self.generated,
            "stats": run.stats,
            "ideal_speedup": run.ideal_speedup(),
            "timings_s": {"load_s": load_s, **self.timings},
        }
        ranks = self.world.gather(mine)
        record = None
        if self.world.is_main:
            done = self.done()
            complete = len(done) == len(self.prompts)
            outputs = self._join() if complete and self.names is None else None
            record = self._write_record(
                "complete" if complete else "interrupted", self._figures(ranks), outputs
            )
        self.world.barrier()
        return record

    def interrupted(self, run: Any, load_s: float = 0.0) -> None:
        """After an error or Ctrl-C: rank 0 records what is there; a new folder with nothing is removed."""
        if not self.world.is_main:
            return
        if not self.resumed and not self.done() and not (self.out / PARTS).exists():
            (self.out / RUN_RECORD).unlink(missing_ok=True)
            if not self.existed and self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()  # nothing was written: leave no empty folder behind
            return
        figures = {"timings_s": {"load_s": load_s, **self.timings}}
        if run is not None:
            figures.update(stats=run.stats, ideal_speedup=run.ideal_speedup())
        self._write_record("interrupted", figures)

    def _figures(self, ranks: list[dict[str, Any]]) -> dict[str, Any]:
        """Totals of the processes' stats and timings, and each process's own beside them."""
        first = ranks[0]
        if len(ranks) == 1:
            return {k: first[k] for k in ("stats", "ideal_speedup", "timings_s")}
        stats = dict(first["stats"])  # the last call's strategy figures are rank 0's
        for key in ("calls", "nfe", "served", "time_s"):
            stats[key] = sum(r["stats"].get(key, 0) for r in ranks)
        hooks: dict[str, float] = {}
        for r in ranks:
            for name, t in (r["stats"].get("hook_time_s") or {}).items():
                hooks[name] = hooks.get(name, 0.0) + t
        stats["hook_time_s"] = hooks
        totals: dict[str, dict[str, Any]] = {}  # counters summed; derived rates are per rank
        for r in ranks:
            for name, figures in (r["stats"].get("totals") or {}).items():
                mine = totals.setdefault(name, {})
                for k, v in figures.items():
                    if isinstance(v, int) and not isinstance(v, bool):
                        mine[k] = mine.get(k, 0) + v
        stats["totals"] = totals
        timings = {
            k: max(r["timings_s"].get(k, 0.0) for r in ranks) for k in first["timings_s"]
        }  # the slowest process sets the job's time
        return {
            "stats": stats,
            "ideal_speedup": first["ideal_speedup"],
            "timings_s": timings,
            "ranks": ranks,
        }

    def _join(self) -> list[Any] | None:
        """The batches' shared files joined in prompt order into the folder; the rows of a JSONL file."""
        parts = self._parts()
        folders = [self.out / PARTS / f"{first:06d}-{stop:06d}" for first, stop in parts]
        names = sorted({p.name for f in folders for p in f.iterdir()})
        rows: list[Any] | None = None
        for name in names:
            if Path(name).suffix not in JOINABLE:
                raise ConfigError(
                    "output.dir",
                    f"the {self.cfg.adapter.name!r} pipeline writes {name!r} for all prompts "
                    "together, which decodekit cannot join from batches; run it in one process "
                    "and one batch",
                )
            data = b"".join((f / name).read_bytes() for f in folders if (f / name).is_file())
            atomic_write_bytes(self.out / name, data)
            if name.endswith(".jsonl") and len(names) == 1:
                rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line]
        shutil.rmtree(self.out / PARTS)
        return rows

    def _write_record(
        self, status: str, extra: dict[str, Any], outputs: Any = None
    ) -> dict[str, Any]:
        import torch

        cfg = self.cfg
        previous = _read_record(self.out) or {}
        record: dict[str, Any] = {
            "status": status,
            "config": cfg.summary(),
            "fingerprint": self.fingerprint,
            "seed": cfg.inputs.seed,
            "versions": self.versions,
            "processes": self.world.size,
            "torch_threads": torch.get_num_threads(),
        }
        for key in ("resuming", "kept", "planned"):
            if key in previous:
                record[key] = previous[key]
        record.update(extra)
        if status != "running":
            kept = set(record.get("kept", []))
            record["files"] = sorted(
                p.name
                for p in self.out.iterdir()
                if p.is_file()
                and p.name not in kept
                and p.name != RUN_RECORD
                and TEMP_MARK not in p.name
            )
            record["resumed"] = {
                "outputs_existing": self.done_before,
                "outputs_generated": self.generated
                if self.world.size == 1
                else sum(r["generated"] for r in extra.get("ranks", [])),
                "outputs_total": len(self.prompts),
            }
            if outputs is None and self.names is not None:
                per = _rows_per_prompt(cfg.inputs)
                outputs = [{} for _ in range(len(self.prompts) * per)]
            record["outputs"] = (
                output_records(cfg.adapter, outputs, cfg.inputs, self.out)
                if outputs is not None
                else []
            )
        write_run_record(self.out, record)
        return record


class _Renamed:
    """A folder for an adapter's ``save``: ``folder / name`` is the file's run-wide path.

    An adapter that joins names to the folder (``out_dir / "000-a.png"``)
    writes each file, atomically, straight under its final name in the run's
    folder; one that goes by the folder's path (``os.fspath``) writes into
    ``stage``, and `place` moves those files to their final names.
    """

    def __init__(self, stage: Path, out: Path, names: dict[str, str]):
        self.stage, self.out, self.names = stage, out, names

    def __truediv__(self, name: Any) -> Path:
        final = self.names.get(str(name))
        return self.out / final if final is not None else self.stage / str(name)

    def __fspath__(self) -> str:
        return os.fspath(self.stage)

    def __str__(self) -> str:
        return str(self.stage)

    def mkdir(self, *args: Any, **kw: Any) -> None:
        self.stage.mkdir(parents=True, exist_ok=True)

    def place(self) -> None:
        """Move the complete files written into ``stage`` to their final names."""
        for local, final in self.names.items():
            if (self.stage / local).is_file():
                os.replace(self.stage / local, self.out / final)


def _counters(run: Any) -> str:
    """`` · sjd accepted=12`` : the first two integer counters of each strategy, for the bar."""
    shown = []
    try:
        strategies = run.stats.get("strategies", {})
    except Exception:
        return ""
    for name, figures in strategies.items():
        ints = [f"{k}={v}" for k, v in figures.items() if isinstance(v, int) and k != "hook_time_s"]
        if ints:
            shown.append(f"{name} {' '.join(ints[:2])}")
    return "".join(f" · {s}" for s in shown)


def _remove_stale(out: Path) -> None:
    """Temporary files and batch folders a killed run left (their names carry ``TEMP_MARK``)."""
    for folder in (out, out / PARTS):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if TEMP_MARK not in p.name or p.is_symlink():
                continue
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()


# -- models split across devices ------------------------------------------------------


def devices_of(target: Any) -> list[str]:
    """The devices a ``device_map`` spread the loaded model over (its ``hf_device_map``), sorted.

    Empty for a model placed whole with ``.to(device)``. Looks at the target and,
    for a transformers pipeline, its ``model``.
    """
    found: set[str] = set()
    for obj in (target, getattr(target, "model", None)):
        placed = getattr(obj, "hf_device_map", None)
        if isinstance(placed, dict):
            found |= {str(v) for v in placed.values()}
        elif isinstance(placed, str):  # diffusers' device_map to one device
            found.add(placed)
    return sorted(found)


def check_placement(target: Any, strategies: list[Any]) -> None:
    """Refuse strategies that cannot run on a model split across devices.

    A strategy runs on a split model only when its class says so
    (``split_devices = True``); none of decodekit's own does yet, as none is
    tested across devices. Raises `ConfigError` at the first other one.
    """
    devices = devices_of(target)
    if len(devices) < 2:
        return
    for i, strategy in enumerate(strategies):
        if not getattr(strategy, "split_devices", False):
            raise ConfigError(
                f"strategies.{i}.name",
                f"{strategy.name!r} cannot run on a model split across devices ({', '.join(devices)}, "
                "from pipeline.options.device_map): its state would meet tensors of another "
                "device. Drop device_map to run it on one device, or run the model without it.",
            )


# -- bench --------------------------------------------------------------------------------


def bench_across(cfg: Any, world: World, json_path: Any, png_path: Any, **kw: Any) -> Any:
    """`decodekit.bench.bench` with each process on its shard of the prompts; rank 0 joins them.

    Every process benches its own prompts (same warm-up, pairs and alternation);
    rank 0 draws the picture of its own shard and writes one JSON: per pair the
    slowest process's time of each arm (the job's time), its median ratio as
    the speed-up, items per second over all processes, and each process's own
    figures under ``ranks``. Returns the joined result on rank 0, None elsewhere.
    """
    from .bench import bench, write_json

    prompts = prompt_list(cfg.inputs)
    shard = world.shard(len(prompts))
    if not len(shard):
        raise ConfigError(
            "inputs.prompt",
            f"{len(prompts)} prompt(s) for {world.size} processes: bench needs at least one "
            "prompt per process; give more prompts or start fewer processes",
        )
    mine = replace(cfg, inputs=slice_inputs(cfg.inputs, shard.start, shard.stop))
    with_earlier = _seeded_bench(bench, prompts[: shard.start])
    result = with_earlier(mine, json_path=None, png_path=png_path if world.is_main else None, **kw)
    local = {k: v for k, v in result.items() if k != "config"}
    local["prompts"] = [shard.start, shard.stop]
    ranks = world.gather({"rank": world.rank, **local})
    if not world.is_main:
        return None
    joined = dict(result)
    base = [max(t) for t in zip(*(r["baseline"]["time_s"]["all"] for r in ranks))]
    strat = [max(t) for t in zip(*(r["strategy"]["time_s"]["all"] for r in ranks))]
    from .bench import pair_ratios
    from .figures import speedup_spread

    ratios = pair_ratios(base, strat)
    joined.update(
        speedup=statistics.median(ratios),
        pair_ratios=ratios,
        speedup_spread=speedup_spread(ratios),
        processes=world.size,
        config=cfg.summary(),
        ranks=ranks,
    )
    for arm, times in (("baseline", base), ("strategy", strat)):
        summary = dict(joined[arm])
        items = sum(r[arm].get("items") or 0 for r in ranks)
        med = statistics.median(times)
        summary.update(
            time_s={"median": med, "min": min(times), "max": max(times), "all": times},
            nfe=sum(r[arm]["nfe"] for r in ranks),
            items=items,
            items_per_s=items / med if items and med > 0 else None,
        )
        joined[arm] = summary
    joined["nfe"] = {
        "baseline": joined["baseline"]["nfe"],
        "strategy": joined["strategy"]["nfe"],
        "ratio": joined["baseline"]["nfe"] / joined["strategy"]["nfe"]
        if joined["strategy"]["nfe"]
        else None,
    }
    if json_path is not None:
        write_json(joined, json_path)
    return joined


def _seeded_bench(bench: Callable[..., Any], before: list[Any]) -> Callable[..., Any]:
    """``bench`` whose generate calls seed the shard as in the whole prompt list."""
    from .seeds import earlier_copies

    def call(*args: Any, **kw: Any) -> Any:
        with earlier_copies(before):
            return bench(*args, **kw)

    return call
