"""Run `decodekit bench` on every examples/<strategy>.yaml and print the benchmark rows.

    python benchmarks/examples_table.py [--repeat N] [--threads N] [--out benchmarks/results/examples/cpu-2core]

Each row is exactly what `decodekit bench examples/<strategy>.yaml --repeat N`
reports; the JSON of each run is kept under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["faster-diffusion", "dkv-cache", "diverse-beam", "superposed"]


def fmt(v, spec=".3g"):
    return "–" if v is None else format(v, spec)


def row(name: str, r: dict) -> str:
    quality = "; ".join(
        f"{k}={fmt(v)}"
        for figures in r["quality"].values()
        for k, v in figures.items()
        if isinstance(v, (int, float))
    )
    strategies = ", ".join(s["name"] for s in r["strategies"])
    return (
        f"| `{name}` | {strategies} | ×{fmt(r['speedup'])} | {('×' + fmt(r['ideal_speedup'])) if r['ideal_speedup'] else '–'} "
        f"| {r['nfe']['baseline']} → {r['nfe']['strategy']} | {quality} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (bench's default: 1)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/examples/cpu-2core")
    ap.add_argument("names", nargs="*", default=EXAMPLES)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.names:
        js = args.out / f"{name}.json"
        cmd = [
            sys.executable,
            "-m",
            "decodekit.cli",
            "bench",
            str(ROOT / "examples" / f"{name}.yaml"),
            "--repeat",
            str(args.repeat),
            "--json",
            str(js),
            "--png",
            str(args.out / f"{name}.png"),
        ] + (["--threads", str(args.threads)] if args.threads else [])
        subprocess.run(
            cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        rows.append(row(name, json.loads(js.read_text())))
    print(
        "| example | strategies | speed-up (median of pairs) | FLOP-ideal | model calls | quality |"
    )
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
