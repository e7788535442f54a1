"""CoDe on the zoo's VAR models: class adherence and Fréchet distance per split, against the drafter alone.

Drafter zoo:shapes-var-d6 (the pipeline's model), refiner zoo:shapes-var-d3 (trained on the
scales from 4x4 on only), both on
zoo:shapes-msvq (scales 1, 2, 3, 4, 6, 8). Every arm samples the same ``N`` images as the
zoo's gate does (`train_shapes_var.sample_classes`: image ``i`` is class ``i mod 24``, its
generator seeded ``50000 + i``) at the models' operating point (``train_shapes_var.OPERATING_POINT``: guidance 1,
temperature 0.6, no top-k). Arms: the drafter alone; ``code`` at each ``--splits`` value of ``draft_steps``;
the refiner alone; and the drafter alone with seeds ``50000 + N + i`` (the floor: how far
two sample sets of the same model lie apart by sampling noise alone).

Reported per arm: the judge's class adherence (shape, colour, both), the Fréchet distance
of the arm's images to ``N`` real renders (the zoo gate's `REAL_EVAL_SEED`) and to the
drafter's images, the FLOP-ideal speed-up (``run.ideal_speedup()``), and the arm's wall
time (one pass, arms in turn: a rough figure; ``decodekit bench examples/code.yaml``
measures the speed-up in alternating pairs).

    .venv/bin/python benchmarks/code.py --threads 1 [--num-images 240] [--splits 2 3 4 5]

Writes benchmarks/results/code/cpu-2core/code_quality.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "code" / "cpu-2core" / "code_quality.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", default="zoo:shapes-var-d6")
    parser.add_argument("--refiner", default="zoo:shapes-var-d3")
    parser.add_argument("--num-images", type=int, default=240)
    parser.add_argument("--splits", type=int, nargs="+", default=[2, 3, 4, 5])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import decodekit
    from decodekit.config import resolve_model
    from decodekit.pipelines.var import VARPipeline
    from decodekit.pipelines.zoo.train_shapes_var import (
        OPERATING_POINT,
        VAR_EVAL_SEED,
        against_first_arm,
        arm_scores,
        judge_and_renders,
        sample_classes,
        write_arm_rows,
    )
    from decodekit.plugins.code import plan_flops

    n = args.num_images
    judge, real = judge_and_renders(n)
    pipe = VARPipeline.from_pretrained(resolve_model(args.drafter))
    refiner = VARPipeline.from_pretrained(resolve_model(args.refiner))
    sampling = dict(OPERATING_POINT)

    def arm(name: str, target: VARPipeline, strategies: list, seed: int) -> dict[str, Any]:
        print(f"{name} ...", file=sys.stderr, flush=True)
        with decodekit.attach(target, strategies) as run:
            start = time.perf_counter()
            images, classes = sample_classes(target, n, seed=seed, **sampling)
            seconds = time.perf_counter() - start
            ideal = run.ideal_speedup()
        return {
            "arm": name,
            "images": images,
            **arm_scores(judge, images, classes, real),
            "ideal_speedup": round(ideal, 3) if ideal is not None else 1.0,
            "seconds": round(seconds, 2),
        }

    arms = [arm("drafter alone", pipe, [], VAR_EVAL_SEED)]
    for k in args.splits:
        params = {"refiner": args.refiner, "draft_steps": k}
        arms.append(
            arm(f"code draft_steps={k}", pipe, [{"name": "code", "params": params}], VAR_EVAL_SEED)
        )
    arms.append(arm("refiner alone", refiner, [], VAR_EVAL_SEED))
    K = len(pipe.patch_nums)  # the refiner alone against the drafter alone, in FLOPs
    ratio = plan_flops([pipe.transformer] * K) / plan_flops([refiner.transformer] * K)
    arms[-1]["ideal_speedup"] = round(ratio, 3)
    arms.append(arm("drafter alone, other seeds (floor)", pipe, [], VAR_EVAL_SEED + n))
    rows = against_first_arm(judge, arms, "drafter")

    write_arm_rows(
        args.out, "benchmarks/code.py", argv if argv is not None else sys.argv[1:], rows,
        threads=args.threads, num_images=n, sampling=sampling, drafter=args.drafter,
        refiner=args.refiner,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
