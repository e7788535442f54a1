"""Where a dkv-cache step spends its time: torch.profiler over one short generation per row.

For a GPU session (benchmarks/gpu_session.sh): it prints, per row, wall time,
device time, host reads per step (decodekit.testing.HostReads) and the
operators with the most self device time and the most self host time, and
writes the tables to --out.

    python benchmarks/profile_dkv.py --device cuda --dtype bfloat16 --out /tmp/profile_dkv.txt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import decodekit
import torch
from decodekit.pipelines.masked_diffusion import MaskedDiffusionLMPipeline
from decodekit.testing import HostReads
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dkv_cache import llada_shaped, sync  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--intermediate", type=int, default=12288)
    ap.add_argument("--vocab", type=int, default=126464)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rows", nargs="+", default=["baseline", "decode", "pd"])
    ap.add_argument("--out", default="profile_dkv.txt")
    return ap.parse_args()


def profile_row(pipe, row: str, kw: dict, device: str) -> list[str]:
    """Warm up, time one call (counting host reads), profile another: the row's report lines."""
    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    sort_device = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    specs = (
        []
        if row == "baseline"
        else [{"name": "dkv-cache", "params": {"variant": row, "refresh_interval": 4}}]
    )
    with decodekit.attach(pipe, specs):
        pipe(**kw)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        with HostReads() as reads:
            pipe(**kw)
        sync(device)
        wall = time.perf_counter() - t0
        with profile(activities=activities) as prof:
            pipe(**kw)
            sync(device)
    table_dev = prof.key_averages().table(sort_by=sort_device, row_limit=15)
    table_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    head = (
        f"== {row}: {wall:.3f} s for 64 steps, host reads per step "
        f"{reads.total / 64:.1f} {dict(reads.counts)}"
    )
    print(head, flush=True)
    return [head, "-- by self device time", table_dev, "-- by self host time", table_cpu]


def main() -> None:
    args = parse_args()
    model = llada_shaped(
        args.width,
        args.layers,
        args.vocab,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
        device=args.device,
        dtype=getattr(torch, args.dtype),
    )
    pipe = MaskedDiffusionLMPipeline(
        model, mask_token_id=args.vocab - 1, eos_token_id=2, pad_token_id=0
    )
    ids = torch.randint(
        3, args.vocab - 1, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0)
    )
    kw = dict(input_ids=ids, gen_length=64, block_length=32, steps=64)
    lines = []
    for row in args.rows:
        lines += profile_row(pipe, row, kw, args.device)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
