"""CSpD on the zoo's MAR models: class adherence and Fréchet distance of each acceptance rule, against the target alone.

Target zoo:shapes-mar (the pipeline's model), draft zoo:shapes-mar-small. Every arm samples
the same ``N`` images as the zoo's gate does (`train_shapes_var.sample_classes`: image ``i``
is class ``i mod 24``, its generator seeded ``50000 + i``) at the models' operating point
(``train_shapes_mar.OPERATING_POINT``: 8 steps, guidance 6 on MAR's linear ramp,
temperature 1), ``--num-iter`` and ``--cfg`` overriding it. Arms: the target alone;
``cspd`` with ``acceptance: paper`` and ``acceptance: exact`` (``--gamma``,
``--prefill-ratio``); the draft alone; and the target alone with seeds ``50000 + N + i``
(the floor: how far two sample sets of the same model lie apart by sampling noise alone).

Reported per arm: the judge's class adherence (shape, colour, both), the Fréchet distance of
the arm's images to ``N`` real renders (the zoo gate's `REAL_EVAL_SEED`) and to the target's
images, cspd's counters over the arm's calls (`run.stats["totals"]`) (drafted tokens kept, target and draft
forwards), and the arm's wall time (one pass, arms in turn: a rough figure;
``decodekit bench examples/cspd.yaml`` measures the speed-up in alternating pairs).

    .venv/bin/python benchmarks/cspd.py --threads 1 [--num-images 240]

Writes benchmarks/results/cspd/cpu-2core/cspd_quality.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "cspd" / "cpu-2core" / "cspd_quality.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="zoo:shapes-mar")
    parser.add_argument("--draft", default="zoo:shapes-mar-small")
    parser.add_argument("--num-images", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=120)
    parser.add_argument("--num-iter", type=int, default=None)
    parser.add_argument("--cfg", type=float, default=None)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--prefill-ratio", type=float, default=0.15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.batch_size % 24:
        parser.error("--batch-size must be a multiple of 24 (the classes, in turn)")
    torch.set_num_threads(args.threads)

    import decodekit
    import decodekit.pipelines.zoo.train_shapes_var as gates  # the zoo gates' samples and scores
    from decodekit.config import resolve_model
    from decodekit.pipelines.mar_pipeline import MARPipeline
    from decodekit.pipelines.zoo.train_shapes_mar import OPERATING_POINT

    n = args.num_images
    judge, real = gates.judge_and_renders(n)
    target = MARPipeline.from_pretrained(resolve_model(args.target))
    draft = MARPipeline.from_pretrained(resolve_model(args.draft))
    sampling = dict(OPERATING_POINT)
    for key in ("num_iter", "cfg"):
        if getattr(args, key) is not None:
            sampling[key] = getattr(args, key)

    def arm(name: str, pipe: MARPipeline, acceptance: str | None, seed: int) -> dict[str, Any]:
        print(f"{name} ...", file=sys.stderr, flush=True)
        strategies = []
        if acceptance is not None:
            params = {"draft": args.draft, "gamma": args.gamma,
                      "prefill_ratio": args.prefill_ratio, "acceptance": acceptance}  # fmt: skip
            strategies = [{"name": "cspd", "params": params}]
        with decodekit.attach(pipe, strategies) as run:
            start = time.perf_counter()
            images, classes = [], []
            for first in range(0, n, args.batch_size):  # a call a batch
                rows = min(args.batch_size, n - first)
                got, cls = gates.sample_classes(pipe, rows, rows, seed=seed + first, **sampling)
                images, classes = images + got, classes + cls  # batches start at class 0
            seconds = time.perf_counter() - start
            totals = run.stats["totals"].get("cspd")  # the counters of every call, summed
        out = {
            "arm": name,
            "images": images,
            **gates.arm_scores(judge, images, classes, real),
            "seconds": round(seconds, 2),
        }
        if totals is not None:
            out["cspd"] = totals
        return out

    arms = [
        arm("target alone", target, None, gates.VAR_EVAL_SEED),
        arm("cspd paper", target, "paper", gates.VAR_EVAL_SEED),
        arm("cspd exact", target, "exact", gates.VAR_EVAL_SEED),
        arm("draft alone", draft, None, gates.VAR_EVAL_SEED),
        arm("target alone, other seeds (floor)", target, None, gates.VAR_EVAL_SEED + n),
    ]
    rows = gates.against_first_arm(judge, arms, "target")

    for r in rows:  # the share of drafts kept, as a column of the table
        if "cspd" in r:
            r["acceptance_rate"] = round(r["cspd"]["acceptance_rate"], 4)
    gates.write_arm_rows(
        args.out, "benchmarks/cspd.py", argv if argv is not None else sys.argv[1:], rows,
        threads=args.threads, num_images=n, sampling=sampling, target=args.target,
        draft=args.draft, gamma=args.gamma, prefill_ratio=args.prefill_ratio,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
