"""SJD on zoo:shapes-ar: judge adherence and Fréchet distance against plain decoding.

Prompts: the captions of the 200 held-out one-shape scenes that the zoo gate samples
(``evaluate_shapes_ar``: `sample_shapes` seed 20000), at the zoo's operating point
(guidance 1.5, temperature 1, top-k 32), batches of 8, one generator per prompt
(`decodekit.seeds.row_generators`, seed 0, as a YAML run seeds its rows). Arms: plain
token-by-token decoding; `sjd` (window 16) with init random / horizontal-repeat and
coupling independent / coupled; and plain again with seeds 1, 2, 3, 4 (``--floors``),
the noise floor. ``--seeds K`` samples every prompt with seeds 0 .. K-1 in every arm
(the floor: K .. 2K-1, 2K .. 3K-1, ...), K x 200 paired images.

Reported per arm: judge adherence (all four attributes; shape and colour), step
compression (image positions / Jacobi steps, over all batches), forward ratio (plain's
LM forwards / the arm's); against plain (same seeds), per prompt: the paired difference in
adherence with a 95% interval and an exact sign test
(`benchmarks/dkv_cache_pooled.py`), and the judge's Fréchet distance of the arm's 200
images to plain's, beside plain-with-another-seed's (the floor). SJD is exact in
distribution, not in samples: the same generator gives a different image, so every arm,
the floor included, differs from plain by sampling noise alone if SJD is exact.

``--timing``: plain and sjd (default window 16, random, independent) alternately on the
16 prompts of examples/sjd.yaml, batch 1 and batch 8, one warm-up pair, median of the
per-pair time ratios (as ``decodekit bench``); ``--windows 2 4 8 16 --inits random
horizontal-repeat --timing-batches 8`` sweeps; ``--no-quality`` skips the judge arms.
A wall-clock figure: run it on a quiet machine (the load average is recorded).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sjd.py [--seeds K] [--timing] 2>&1 \\
        | tee benchmarks/results/sjd/cpu-2core/sjd_quality.log

Writes benchmarks/results/sjd/cpu-2core/sjd_quality.json (``--out`` to change); progress
goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "sjd" / "cpu-2core" / "sjd_quality.json"
ARMS: dict[str, dict[str, str] | None] = {
    "plain": None,
    "sjd random independent": {"init": "random", "coupling": "independent"},
    "sjd random coupled": {"init": "random", "coupling": "coupled"},
    "sjd horizontal-repeat independent": {"init": "horizontal-repeat", "coupling": "independent"},
    "sjd horizontal-repeat coupled": {"init": "horizontal-repeat", "coupling": "coupled"},
}


def _pooled():
    """benchmarks/dkv_cache_pooled.py (sign_test, paired_difference), loaded by path."""
    spec = importlib.util.spec_from_file_location(
        "dkv_cache_pooled", Path(__file__).with_name("dkv_cache_pooled.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def held_out_captions(n: int) -> list[str]:
    """The captions `evaluate_shapes_ar` samples the zoo gate from (seed 20000, one shape)."""
    from decodekit.pipelines.zoo.evaluate import SD_EVAL_SEED
    from decodekit.pipelines.zoo.shapes_data import sample_shapes

    _, scenes = sample_shapes(n, seed=SD_EVAL_SEED, two_shape_fraction=0.0)
    return [s.caption for s in scenes]


def hits(judge, images, prompts: list[str]) -> dict[str, list[bool]]:
    """Per image: do all four attributes match its prompt ("all"), do shape and colour."""
    from decodekit.pipelines.zoo.shapes_data import parse_caption

    out: dict[str, list[bool]] = {"all": [], "shape_colour": []}
    for prediction, prompt in zip(judge.predict(images), prompts, strict=True):
        (wanted,) = parse_caption(prompt).objects
        ok = {k: prediction[k] == getattr(wanted, k) for k in prediction}
        out["all"].append(all(ok.values()))
        out["shape_colour"].append(ok["shape"] and ok["colour"])
    return out


def sample(pipe, prompts: list[str], params: dict | None, seed: int, batch: int, kw: dict):
    """Images of every prompt, batches of ``batch``, plus the summed SJD steps and LM forwards."""
    import decodekit
    from decodekit.seeds import row_generators

    gens = row_generators(seed, prompts)
    specs = [] if params is None else [{"name": "sjd", "params": {"window": 16, **params}}]
    images, steps, forwards = [], 0, 0
    with decodekit.attach(pipe, specs):
        for i in range(0, len(prompts), batch):
            out = pipe(prompts[i : i + batch], generator=gens[i : i + batch], **kw)
            images += out.images
            forwards += out.forwards
            # plain decoding: one position per step by definition
            steps += out.stats.get("steps", pipe.config.num_positions)
    return images, steps, forwards


def paired(base: list[bool], arm: list[bool]) -> dict[str, Any]:
    """Paired comparison of one arm's per-prompt hits with plain's."""
    pooled = _pooled()
    n = len(base)
    b = sum(x and not y for x, y in zip(base, arm, strict=True))  # plain right, arm wrong
    c = sum(y and not x for x, y in zip(base, arm, strict=True))
    diff, low, high = pooled.paired_difference(n, b, c)
    return {
        "right_to_wrong": b,
        "wrong_to_right": c,
        "difference_points": round(100 * diff, 2),
        "ci95_points": [round(100 * low, 2), round(100 * high, 2)],
        "sign_test_p": round(pooled.sign_test(b, c), 4),
    }


def quality(pipe, args, kw: dict) -> dict[str, Any]:
    from decodekit.pipelines.zoo.shapes_judge import ShapesJudge

    judge = ShapesJudge.load()
    prompts = held_out_captions(args.prompts)
    N = pipe.config.num_positions
    K = args.seeds
    seeds = [args.seed + i for i in range(K)]
    arms = [(name, params, seeds) for name, params in ARMS.items()]
    # the floor: plain again on seeds disjoint from plain's (K = 1: seed + 1, seed + 2, ...)
    floors = [f"plain seed +{j * K}" for j in range(1, args.floors + 1)]
    arms += [(name, None, [s + j * K for s in seeds]) for j, name in enumerate(floors, 1)]
    samples: dict[str, dict[str, Any]] = {}
    for name, params, arm_seeds in arms:
        t0 = time.perf_counter()
        s: dict[str, Any] = {"images": [], "steps": 0, "forwards": 0}
        for seed in arm_seeds:
            images, steps, forwards = sample(pipe, prompts, params, seed, args.batch, kw)
            s["images"] += images
            s["steps"] += steps
            s["forwards"] += forwards
        s["hits"] = hits(judge, s["images"], prompts * K)
        samples[name] = s
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    base = samples["plain"]
    calls = K * -(-len(prompts) // args.batch)
    n = K * len(prompts)
    rows = {}
    for name, s in samples.items():
        row: dict[str, Any] = {
            "adherence": round(sum(s["hits"]["all"]) / n, 4),
            "adherence_shape_colour": round(sum(s["hits"]["shape_colour"]) / n, 4),
            "steps": s["steps"],
            "forwards": s["forwards"],
            "step_compression": round(N * calls / s["steps"], 3),
            "forward_ratio": round(base["forwards"] / s["forwards"], 3),
        }
        if name != "plain":
            row["vs_plain_adherence"] = paired(base["hits"]["all"], s["hits"]["all"])
            row["vs_plain_shape_colour"] = paired(
                base["hits"]["shape_colour"], s["hits"]["shape_colour"]
            )
            row["frechet_to_plain"] = round(judge.frechet(s["images"], base["images"]), 3)
        rows[name] = row
    return {
        "prompts": len(prompts),
        "seeds": seeds,
        "images_per_arm": n,
        "image_positions": N,
        "arms": rows,
        "frechet_floor": [rows[name]["frechet_to_plain"] for name in floors],
    }


def timing(pipe, args, kw: dict) -> dict[str, Any]:
    """Plain and sjd alternately on the example's 16 prompts, per batch size and SJD setting."""
    import decodekit
    import yaml
    from decodekit.seeds import row_generators

    config = yaml.safe_load((ROOT / "examples" / "sjd.yaml").read_text())
    prompts = config["inputs"]["prompt"]

    def call(batch: int) -> tuple[float, int, int]:
        gens = row_generators(args.seed, prompts)
        t0 = time.perf_counter()
        forwards = steps = 0
        for i in range(0, len(prompts), batch):
            out = pipe(prompts[i : i + batch], generator=gens[i : i + batch], **kw)
            forwards += out.forwards
            steps += out.stats.get("steps", pipe.config.num_positions)
        return time.perf_counter() - t0, forwards, steps

    out: dict[str, Any] = {"prompts": len(prompts), "load_average_before": os.getloadavg()}
    rows = []
    for batch in args.timing_batches:
        for window in args.windows:
            for init in args.inits:
                spec = [{"name": "sjd", "params": {"window": window, "init": init}}]
                times: dict[str, list[float]] = {"plain": [], "sjd": []}
                counts = {}
                for rep in range(args.repeat + 1):  # the first pair is the warm-up
                    for name in ("plain", "sjd"):
                        with decodekit.attach(pipe, [] if name == "plain" else spec):
                            seconds, *counts[name] = call(batch)
                        if rep:
                            times[name].append(seconds)
                ratios = [p / s for p, s in zip(times["plain"], times["sjd"], strict=True)]
                calls = -(-len(prompts) // batch)
                row = {
                    "batch": batch,
                    "window": window,
                    "init": init,
                    "plain_s": [round(t, 4) for t in times["plain"]],
                    "sjd_s": [round(t, 4) for t in times["sjd"]],
                    "pair_ratios": [round(r, 3) for r in ratios],
                    "speedup": round(statistics.median(ratios), 3),
                    "forwards": {"plain": counts["plain"][0], "sjd": counts["sjd"][0]},
                    "forward_ratio": round(counts["plain"][0] / counts["sjd"][0], 3),
                    "step_compression": round(
                        pipe.config.num_positions * calls / counts["sjd"][1], 3
                    ),
                }
                rows.append(row)
                print(
                    f"timing batch {batch} window {window} {init}: x{row['speedup']}, "
                    f"steps x{row['step_compression']}",
                    file=sys.stderr,
                    flush=True,
                )
    out["rows"] = rows
    out["load_average_after"] = os.getloadavg()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--seeds", type=int, default=1, help="sample every prompt with seeds seed .. seed + K - 1"
    )
    ap.add_argument("--floors", type=int, default=4, help="plain runs on other seeds (the floor)")
    ap.add_argument("--timing", action="store_true", help="also time plain vs sjd (wall clock)")
    ap.add_argument("--repeat", type=int, default=3, help="timed pairs per timing row")
    ap.add_argument("--timing-batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--windows", type=int, nargs="+", default=[16], help="SJD windows to time")
    ap.add_argument("--inits", nargs="+", default=["random"], help="SJD inits to time")
    ap.add_argument("--no-quality", action="store_true", help="only --timing")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from decodekit.pipelines.ar_image import ARImagePipeline
    from decodekit.pipelines.zoo import zoo_path

    pipe = ARImagePipeline.from_pretrained(zoo_path("shapes-ar"))
    kw = dict(guidance_scale=1.5, temperature=1.0, top_k=32)
    given = shlex.join(argv if argv is not None else sys.argv[1:])
    command = f"OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sjd.py {given}".strip()
    report: dict[str, Any] = {
        "model": "zoo:shapes-ar",
        "sampling": kw | {"window": 16, "batch": args.batch, "seed": args.seed},
        "machine": "cpu-2core: 2-core x86_64 CPU, no GPU; torch.set_num_threads(1)",
        "command": command,
    }
    if not args.no_quality:
        report |= quality(pipe, args, kw)
    if args.timing:
        report["timing"] = timing(pipe, args, kw)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
