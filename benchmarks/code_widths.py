"""CoDe at VAR's own widths with random weights: wall time and peak memory, drafter alone against `code`.

The released VAR models tie the width to the depth (``64 * depth``, heads 64 wide): VAR-d30
is 1920 wide, VAR-d16 1024. This builds a drafter and a refiner of the given depths that
way (random weights: time and memory do not depend on them; quality is not measured) on a
random VQ-VAE of VAR's layout (``vae_ch160v4096z32``: 10 scales, 1, 2, ... 16, 680 tokens,
256x256 images; ``--vq-ch`` narrows it for a smoke test), and times, in alternating pairs,
one call of the drafter alone and one of ``code`` at each ``--splits`` value of
``draft_steps``: guidance 1.5 (a doubled batch), top-k 900, top-p 0.96, one generator per
row, the images decoded (output_type "tokens" plus the VQ-VAE's decoder, so no PIL
conversion is timed). On CUDA each call is synchronised and its peak allocated memory
(``torch.cuda.max_memory_allocated`` after a reset) recorded; on the CPU the resident-set
growth is not taken (use ``decodekit bench`` there).

    python benchmarks/code_widths.py --device cuda --dtype bfloat16 --depths 30 16 --splits 8 6
    python benchmarks/code_widths.py --depths 2 1 --width-per-depth 16 --vq-ch 32 --batch 2 --repeat 1

Writes JSON to ``--out`` (default benchmarks/results/code/gpu/code_widths.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "code" / "gpu" / "code_widths.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build(args: argparse.Namespace) -> tuple[Any, Any]:
    """The drafter's pipeline and the refiner transformer, random, on the device and dtype."""
    from decodekit.pipelines.var import VARPipeline, VARTransformer
    from decodekit.pipelines.var_vq import MultiScaleVQConfig, MultiScaleVQVAE

    torch.manual_seed(0)
    vq = MultiScaleVQVAE(MultiScaleVQConfig(ch=args.vq_ch)).eval().requires_grad_(False)
    big, small = args.depths
    pipe = VARPipeline.from_transformer(
        vq,
        num_classes=1000,
        depth=big,
        embed_dim=args.width_per_depth * big,
        num_heads=max(1, args.width_per_depth * big // args.head_dim),
        seed=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        refiner = VARTransformer(
            num_classes=1000,
            depth=small,
            embed_dim=args.width_per_depth * small,
            num_heads=max(1, args.width_per_depth * small // args.head_dim),
            patch_nums=tuple(vq.patch_nums),
            vocab_size=vq.vocab_size,
            vae_embed_dim=vq.embed_dim,
        ).eval()
    dtype = DTYPES[args.dtype]
    pipe.transformer.to(device=args.device, dtype=dtype)
    pipe.vq.to(device=args.device, dtype=dtype)
    refiner.to(device=args.device, dtype=dtype)
    return pipe, refiner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--depths", type=int, nargs=2, default=[30, 16], metavar=("DRAFTER", "REFINER")
    )
    parser.add_argument("--width-per-depth", type=int, default=64, help="VAR: 64")
    parser.add_argument("--head-dim", type=int, default=64, help="VAR: 64")
    parser.add_argument("--vq-ch", type=int, default=160, help="VQ-VAE base width (VAR: 160)")
    parser.add_argument("--splits", type=int, nargs="+", default=[8, 6])
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--repeat", type=int, default=5, help="timed pairs per arm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import decodekit

    with torch.device(args.device):  # weights drawn where they run (VAR-d30: 2 B parameters)
        pipe, refiner = build(args)
    cuda = torch.device(args.device).type == "cuda"
    params = {
        "drafter": sum(p.numel() for p in pipe.transformer.parameters()),
        "refiner": sum(p.numel() for p in refiner.parameters()),
    }
    print(json.dumps(params), file=sys.stderr, flush=True)

    def call(strategies: list, batch: int) -> tuple[float, int | None, float | None]:
        """One timed call: seconds, peak allocated bytes (CUDA), FLOP-ideal speed-up."""
        labels = [(7 * i) % 1000 for i in range(batch)]
        gens = [torch.Generator(args.device).manual_seed(i) for i in range(batch)]
        with decodekit.attach(pipe, strategies) as run:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            out = pipe(labels, cfg=1.5, top_k=900, top_p=0.96, generator=gens, output_type="tokens")
            pipe.vq.fhat_to_img(out.f_hat)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() if cuda else None
            ideal = run.ideal_speedup() if strategies else 1.0
        return seconds, peak, ideal

    rows = []
    for batch in args.batch:
        arms: dict[str, list] = {"drafter alone": []}
        for k in args.splits:
            arms[f"code draft_steps={k}"] = [
                {"name": "code", "params": {"refiner": refiner, "draft_steps": k}}
            ]
        for strategies in arms.values():  # warm-up
            call(strategies, batch)
        times: dict[str, list[float]] = {name: [] for name in arms}
        peaks: dict[str, int | None] = {}
        ideals: dict[str, float | None] = {}
        for _ in range(args.repeat):
            for name, strategies in arms.items():
                seconds, peak, ideal = call(strategies, batch)
                times[name].append(seconds)
                peaks[name] = max(peaks.get(name) or 0, peak) if peak is not None else None
                ideals[name] = ideal
        base = times["drafter alone"]
        for name in arms:
            ratios = [b / s for b, s in zip(base, times[name])]
            row = {
                "batch": batch,
                "arm": name,
                "time_s_median": statistics.median(times[name]),
                "time_s_all": times[name],
                "speedup_median": statistics.median(ratios),
                "speedup_pairs": ratios,
                "ideal_speedup": ideals[name],
                "peak_allocated_bytes": peaks[name],
            }
            rows.append(row)
            print(
                f"batch {batch:3d} {name:22} {row['time_s_median']:.4f} s  "
                f"x{row['speedup_median']:.2f} (ideal x{row['ideal_speedup']:.2f})  "
                f"peak {peaks[name]}",
                flush=True,
            )
    result = {
        "command": "benchmarks/code_widths.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": args.dtype,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "depths": args.depths,
        "width_per_depth": args.width_per_depth,
        "vq_ch": args.vq_ch,
        "parameters": params,
        "sampling": {"cfg": 1.5, "top_k": 900, "top_p": 0.96},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
