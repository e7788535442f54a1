"""Pool the accuracy of one dkv-cache row over several ``dkv_cache.py`` runs.

Each run (``--model zoo-fewshot``, different ``--skip-batches``) measures the baseline
and the row on its own prompts; the runs must not overlap. The comparison is paired
(the same prompts with and without the cache), so what decides it is the prompts whose
answer changed: ``right_to_wrong`` (b) and ``wrong_to_right`` (c). Reported: pooled
accuracies, their difference in points, an exact two-sided sign test on b against c,
and a 95% Wald interval for the paired difference, (c - b) / n with variance
(b + c - (c - b)^2 / n) / n^2.

    .venv/bin/python benchmarks/dkv_cache_pooled.py --config decode@8 \
        benchmarks/results/dkv-cache/cpu-2core/dkv_cache_fewshot_control.json \
        benchmarks/results/dkv-cache/cpu-2core/dkv_cache_fewshot_128to255.json --out pooled.json

A run whose only cached row is ``decode`` (one ``--refresh-interval``) is read as
``decode@<its interval>``.
"""

from __future__ import annotations

import argparse
import json
import math


def sign_test(b: int, c: int) -> float:
    """Exact two-sided binomial test of b successes in b + c trials at p = 1/2."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_difference(n: int, b: int, c: int) -> tuple[float, float, float]:
    """(difference, low, high) of accuracy (cached minus baseline), as fractions.

    b prompts went right -> wrong and c wrong -> right out of n paired prompts; the
    interval is the 95% Wald interval for a difference of paired proportions.
    """
    if n <= 0 or b < 0 or c < 0 or b + c > n:
        raise ValueError(f"need 0 <= b + c <= n, got n={n}, b={b}, c={c}")
    diff = (c - b) / n
    var = (b + c - (c - b) ** 2 / n) / n**2
    half = 1.959964 * math.sqrt(max(var, 0.0))
    return diff, diff - half, diff + half


def row_of(run: dict, config: str) -> dict:
    names = {r["config"]: r for r in run["rows"]}
    if config in names:
        return names[config]
    intervals = run["args"].get("refresh_interval") or []
    base, _, every = config.partition("@")
    if base in names and every and [str(i) for i in intervals] == [every]:
        return names[base]
    raise SystemExit(f"no row {config!r} in a run with rows {sorted(names)}")


def prompt_range(run: dict) -> tuple[int, int]:
    a = run["args"]
    batch = a["batches"][0]
    return (a.get("skip_batches") or 0) * batch, a["prompt_batches"] * batch


def pool(runs: list[dict], config: str) -> dict:
    spans = sorted(prompt_range(r) for r in runs)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start < end:
            raise SystemExit(f"runs overlap: prompts {spans}; give each prompt range once")
    n = base_right = b = c = 0
    parts = []
    for run in runs:
        first, end = prompt_range(run)
        m = end - first
        base = row_of(run, "baseline")
        row = row_of(run, config)
        right = round(base["accuracy"] * m)
        n += m
        base_right += right
        b += row["right_to_wrong"]
        c += row["wrong_to_right"]
        parts.append(
            {
                "prompts": [first, end - 1],
                "baseline_right": right,
                "right_to_wrong": row["right_to_wrong"],
                "wrong_to_right": row["wrong_to_right"],
                "speedup": row["speedup"],
                "ideal_speedup": row["ideal_speedup"],
            }
        )
    diff, low, high = paired_difference(n, b, c)
    return {
        "config": config,
        "prompts": n,
        "baseline_accuracy": round(base_right / n, 4),
        "accuracy": round((base_right - b + c) / n, 4),
        "right_to_wrong": b,
        "wrong_to_right": c,
        "difference_points": round(100 * diff, 2),
        "ci95_points": [round(100 * low, 2), round(100 * high, 2)],
        "sign_test_p": round(sign_test(b, c), 4),
        "runs": parts,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="dkv_cache.py JSON files over disjoint prompts")
    ap.add_argument("--config", default="decode@8")
    ap.add_argument("--out")
    args = ap.parse_args()
    runs = [json.load(open(p)) for p in args.runs]
    result = pool(runs, args.config)
    result["files"] = args.runs
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
