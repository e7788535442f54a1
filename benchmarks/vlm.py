"""Token-pruning strategies at LLaVA-1.5-7B's widths with random weights: prefill and decode time,
K/V cache and peak memory, baseline against `fastv` and `dynamic-llava`.

Builds a ``LlavaForConditionalGeneration`` of LLaVA-1.5-7B's shape (random weights: time
and memory do not depend on them; answer quality is not measured): a CLIP ViT-L/14 tower
at 336 px (577 positions, 24 layers 1024 wide, 16 heads; the image's 576 patch features
from the second-to-last layer go to the language model), LLaVA's two-layer GELU
projector, and a Llama-7B language model (32 layers, 4096 wide, 11008, 32 heads, vocabulary
32064). Each row is ``<s>``, the 576 image tokens and ``--text`` random text tokens; every
arm generates ``--new`` tokens greedily (``min_new_tokens`` too, so random weights do not
stop early). Arms run in alternating order after one warm-up each, ``--repeat`` times, at
each ``--batch``; the vlm adapter (`decodekit.pipelines.vlm_adapter`) splits each call's
forward time into prefill (the first forward, vision tower included) and decode, and
measures the K/V cache held at the end; on CUDA every forward is synchronised and each
call's peak allocated memory above the weights recorded.

    python benchmarks/vlm.py --device cuda --dtype bfloat16 --batch 1 8
    python benchmarks/vlm.py --tiny --batch 2 --repeat 1      # a CPU smoke test at tiny widths

``dynamic-llava`` runs without a predictor (its training-free scorer, the hidden states'
L2 norm at layer K); an arm whose strategy is not installed is reported as skipped.
Writes JSON to ``--out`` (default benchmarks/results/vlm/gpu/vlm_llava7b.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "vlm" / "gpu" / "vlm_llava7b.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMAGE_ID = 32000  # LLaVA-1.5's <image> id, past Llama's 32000 words
LLAVA7B = {
    "vision_width": 1024,
    "vision_layers": 24,
    "vision_heads": 16,
    "vision_intermediate": 4096,
    "image_size": 336,
    "patch": 14,
    "width": 4096,
    "layers": 32,
    "heads": 32,
    "kv_heads": 32,
    "intermediate": 11008,
    "vocab": 32064,
}
TINY = {
    "vision_width": 32,
    "vision_layers": 2,
    "vision_heads": 4,
    "vision_intermediate": 64,
    "image_size": 56,
    "patch": 14,
    "width": 64,
    "layers": 6,
    "heads": 4,
    "kv_heads": 4,
    "intermediate": 128,
    "vocab": 32064,
}
"""``--tiny``: the same layout at toy widths (16 image tokens), for a smoke test on the CPU."""


def llava_config(w: dict[str, int]):
    """A `LlavaConfig` of the widths ``w`` (LLaVA-1.5's layout: feature layer -2, CLS dropped)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=w["vision_width"],
        intermediate_size=w["vision_intermediate"],
        num_hidden_layers=w["vision_layers"],
        num_attention_heads=w["vision_heads"],
        image_size=w["image_size"],
        patch_size=w["patch"],
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=w["vocab"],
        hidden_size=w["width"],
        intermediate_size=w["intermediate"],
        num_hidden_layers=w["layers"],
        num_attention_heads=w["heads"],
        num_key_value_heads=w["kv_heads"],
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_ID,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(w["image_size"] // w["patch"]) ** 2,
    )


def build(w: dict[str, int], device: str, dtype: torch.dtype):
    """The random model, drawn on ``device`` in ``dtype`` (sdpa attention, eval mode)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):  # drawn where it runs: no 14 GB copy from the host
        model = LlavaForConditionalGeneration._from_config(
            llava_config(w), dtype=dtype, attn_implementation="sdpa"
        )
    model.generation_config.pad_token_id = 0
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def model_inputs(model, w: dict[str, int], batch: int, text: int) -> dict[str, torch.Tensor]:
    """``<s>``, the image tokens and ``text`` random words per row; random pixels."""
    g = torch.Generator().manual_seed(batch)
    n_image = model.config.image_seq_length
    words = torch.randint(5, 32000, (batch, text), generator=g)
    ids = torch.cat(
        [torch.ones(batch, 1, dtype=torch.long), torch.full((batch, n_image), IMAGE_ID), words], 1
    )
    size = w["image_size"]
    pixels = torch.randn(batch, 3, size, size, generator=g)
    return {
        "input_ids": ids.to(model.device),
        "attention_mask": torch.ones_like(ids).to(model.device),
        "pixel_values": pixels.to(model.device, model.dtype),
    }


def weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_once(model, specs: list[dict[str, Any]], enc, new: int) -> dict[str, Any]:
    """One greedy generate with ``specs`` attached: times, the adapter's figures, peak memory."""
    import decodekit

    cuda = model.device.type == "cuda"
    with decodekit.attach(model, specs, pipeline="vlm") as run:
        if cuda:
            torch.cuda.synchronize(model.device)
            torch.cuda.reset_peak_memory_stats(model.device)
        t0 = time.perf_counter()
        out = model.generate(
            **enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None
        )
        if cuda:
            torch.cuda.synchronize(model.device)
        dt = time.perf_counter() - t0
        stats = run.stats
    peak = torch.cuda.max_memory_allocated(model.device) - weights_bytes(model) if cuda else None
    strategies = {k: {n: v for n, v in s.items()} for k, s in stats["strategies"].items()}
    return {
        "time_s": dt,
        **stats["pipeline"],
        "peak_above_weights_bytes": peak,
        "strategies": strategies,
        "tokens": out[:, enc["input_ids"].shape[1] :].tolist(),
    }


def arms(keep: float, layer: int, names: list[str]) -> dict[str, list[dict[str, Any]]]:
    """``baseline`` and each installed strategy at ``keep`` and ``layer``."""
    from decodekit.manager import get_manager

    installed = get_manager().registry.strategies
    out: dict[str, list[dict[str, Any]]] = {"baseline": []}
    for name in names:
        if name in installed:
            out[name] = [{"name": name, "params": {"layer": layer, "keep_ratio": keep}}]
        else:
            print(f"skip {name}: not installed", file=sys.stderr)
    return out


def summary(runs: list[dict[str, Any]], base: dict[str, Any] | None) -> dict[str, Any]:
    """Medians over runs, and speed-ups / savings against the baseline's medians."""
    med = {
        k: statistics.median(r[k] for r in runs)
        for k in ("time_s", "prefill_s", "decode_s", "kv_cache_bytes")
    }
    peaks = [r["peak_above_weights_bytes"] for r in runs if r["peak_above_weights_bytes"]]
    med["peak_above_weights_bytes"] = max(peaks) if peaks else None
    med["decode_ms_per_token"] = 1e3 * med["decode_s"] / max(1, runs[-1]["decode_forwards"])
    last = runs[-1]["strategies"]
    flops = [s.get("prefill_flops_ratio") for s in last.values() if "prefill_flops_ratio" in s]
    med["prefill_flops_ratio"] = flops[0] if flops else 1.0
    if base is not None:
        med["speedup"] = base["time_s"] / med["time_s"]
        med["prefill_speedup"] = base["prefill_s"] / med["prefill_s"]
        med["decode_speedup"] = base["decode_s"] / med["decode_s"]
        med["kv_cache_ratio"] = med["kv_cache_bytes"] / base["kv_cache_bytes"]
        if med["peak_above_weights_bytes"] and base["peak_above_weights_bytes"]:
            med["peak_ratio"] = med["peak_above_weights_bytes"] / base["peak_above_weights_bytes"]
    med["times_s"] = [r["time_s"] for r in runs]
    med["strategy_stats"] = last
    return med


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--tiny", action="store_true", help="toy widths (a CPU smoke test)")
    for key, value in LLAVA7B.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"({value})")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--text", type=int, default=64, help="text tokens after the image")
    ap.add_argument("--new", type=int, default=128, help="tokens generated")
    ap.add_argument("--keep", type=float, default=0.25, help="keep_ratio of every strategy")
    ap.add_argument("--layer", type=int, default=2, help="K of every strategy")
    ap.add_argument("--strategies", nargs="+", default=["fastv", "dynamic-llava"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = dict(TINY if args.tiny else LLAVA7B)
    widths.update({k: getattr(args, k) for k in widths if getattr(args, k) is not None})
    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    model = build(widths, args.device, dtype)
    build_s = time.perf_counter() - t0
    print(f"built in {build_s:.1f} s: {weights_bytes(model) / 2**30:.2f} GiB of weights")
    configs = arms(args.keep, args.layer, args.strategies)
    result: dict[str, Any] = {
        "widths": widths,
        "device": args.device,
        "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "text_tokens": args.text,
        "image_tokens": model.config.image_seq_length,
        "new_tokens": args.new,
        "keep_ratio": args.keep,
        "layer": args.layer,
        "repeat": args.repeat,
        "build_s": build_s,
        "batches": {},
    }
    for batch in args.batch:
        enc = model_inputs(model, widths, batch, args.text)
        for specs in configs.values():  # warm-up
            run_once(model, specs, enc, args.new)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
        for r in range(args.repeat):
            order = list(configs) if r % 2 == 0 else list(reversed(configs))
            for name in order:
                runs[name].append(run_once(model, configs[name], enc, args.new))
        base = summary(runs["baseline"], None)
        rows = {"baseline": base}
        for name in configs:
            if name != "baseline":
                rows[name] = summary(runs[name], base)
                same = [
                    a == b
                    for x, y in zip(runs["baseline"][-1]["tokens"], runs[name][-1]["tokens"])
                    for a, b in zip(x, y)
                ]
                rows[name]["token_agreement"] = sum(same) / len(same)
        result["batches"][str(batch)] = rows
        for name, row in rows.items():
            print(
                f"batch {batch} {name:14} total {row['time_s']:.3f} s  prefill "
                f"{row['prefill_s']:.3f} s  decode {row['decode_ms_per_token']:.2f} ms/token  "
                f"K/V {row['kv_cache_bytes'] / 2**20:.1f} MiB  prefill FLOPs "
                f"x{row['prefill_flops_ratio']:.3f}"
                + (
                    f"  speed-up x{row['speedup']:.2f} (prefill x{row['prefill_speedup']:.2f},"
                    f" decode x{row['decode_speedup']:.2f})"
                    if name != "baseline"
                    else ""
                )
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after every batch
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
