"""Benchmark dkv-cache variants (and + threshold decoding) against the uncached pipeline.

Runs the masked-diffusion-lm pipeline on zoo:arith-mdlm when it exists, else on a
randomly initialised LLaDA-shaped (bidirectional Llama, GQA) model, alternating
baseline and strategy runs after a warm-up; reports median wall time, tokens/s
speed-up, NFE, tokens computed and token agreement with the baseline.

    .venv/bin/python benchmarks/dkv_cache.py --out benchmarks/results/dkv_cache.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import decodekit
import torch
from decodekit.pipelines.masked_diffusion import MaskedDiffusionLMPipeline


def llada_shaped(width: int, layers: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=int(width * 8 / 3),
                      num_hidden_layers=layers, num_attention_heads=width // 32,
                      num_key_value_heads=max(1, width // 128), max_position_embeddings=1024,
                      is_causal=False)
    return LlamaForCausalLM(cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/dkv_cache.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vocab = 512
    model = llada_shaped(args.width, args.layers, vocab)
    pipe = MaskedDiffusionLMPipeline(model, mask_token_id=vocab - 1, eos_token_id=2, pad_token_id=0)
    configs = {
        "baseline": ([], {}),
        "decode": ([{"name": "dkv-cache", "params": {"variant": "decode", "refresh_interval": 4}}], {}),
        "greedy": ([{"name": "dkv-cache", "params": {"variant": "greedy", "refresh_interval": 4}}], {}),
        "prefill": ([{"name": "dkv-cache", "params": {"variant": "prefill"}}], {}),
        "pd": ([{"name": "dkv-cache", "params": {"variant": "pd", "refresh_interval": 4}}], {}),
        "threshold": ([{"name": "parallel-threshold", "params": {"threshold": 0.9}}], {}),
        "decode+threshold": ([{"name": "dkv-cache", "params": {"variant": "decode"}},
                              {"name": "parallel-threshold", "params": {"threshold": 0.9}}], {}),
    }
    results = {"machine": f"{platform.processor() or platform.machine()}, CPU, "
               f"{args.threads} thread(s), no GPU", "args": vars(args),
               "model": f"random LLaDA-shaped bidirectional Llama, width {args.width}, "
               f"{args.layers} layers, vocab {vocab} (zoo:arith-mdlm not trained yet)",
               "rows": []}
    gkw = dict(gen_length=args.gen_length, block_length=args.block, steps=args.steps)
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(3, vocab - 1, (batch, args.prompt), generator=g)

        def run(strategies, ids=ids):
            start = time.perf_counter()
            if strategies:
                with decodekit.attach(pipe, strategies) as r:
                    out = pipe(input_ids=ids, **gkw)
                ideal = r.ideal_speedup()
            else:
                out, ideal = pipe(input_ids=ids, **gkw), None
            return time.perf_counter() - start, out, ideal

        run([])  # warm-up
        times = {k: [] for k in configs}
        outs = {}
        for _ in range(args.repeats):
            for name, (strategies, _) in configs.items():
                t, out, ideal = run(strategies)
                times[name].append(t)
                outs[name] = (out, ideal)
        base_t = statistics.median(times["baseline"])
        base_seq = outs["baseline"][0].sequences
        for name in configs:
            out, ideal = outs[name]
            t = statistics.median(times[name])
            row = {
                "batch": batch, "config": name, "median_s": round(t, 3),
                "tokens_per_s": round(batch * args.gen_length / t, 1),
                "speedup": round(base_t / t, 2), "nfe": out.nfe,
                "tokens_computed": sum(out.tokens_computed),
                "ideal_speedup": None if ideal is None else round(ideal, 2),
                "token_agreement": round(float((out.sequences == base_seq).double().mean()), 3),
            }
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
