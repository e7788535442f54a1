"""Benchmark dkv-cache variants, block-cache (prefix, dual) and threshold decoding against the uncached pipeline.

Runs the masked-diffusion-lm pipeline on a randomly initialised LLaDA-shaped
(bidirectional Llama, GQA) model (``--model random``, the default) or on
zoo:arith-mdlm (``--model zoo``: held-out sums as prompts, exact-answer accuracy
reported) or zoo:arith-mdlm-fewshot (``--model zoo-fewshot``: the same sums,
zero-padded, after a ``--shots``-problem context of about 425 tokens). After a
warm-up, each prompt batch runs through every row in turn (so drift in the
machine's speed hits all rows alike); reports median wall time, tokens/s
speed-up, NFE, tokens computed, token agreement with the baseline, and on the zoo
models accuracy and the answers that changed.

    .venv/bin/python benchmarks/dkv_cache.py --out benchmarks/results/dkv-cache/cpu-2core/dkv_cache.json
    .venv/bin/python benchmarks/dkv_cache.py --model zoo --gen-length 64 --block 32 --steps 64 \
        --out benchmarks/results/dkv-cache/cpu-2core/dkv_cache_zoo.json
    .venv/bin/python benchmarks/dkv_cache.py --model zoo-fewshot --gen-length 256 --block 32 \
        --steps 256 --batches 8 --prompt-batches 16 --repeats 1 --threads 2 \
        --configs decode@4 decode@6 decode@8 decode@8+r2 pd@8 --refresh-interval 4 6 8 \
        --block-refresh-steps 1 2 --out benchmarks/results/dkv-cache/cpu-2core/dkv_cache_fewshot.json

Every dLLM cache beside the others at the zoo's few-shot setting (a 5-token answer
window; all rows by default), then compiled (``--compile``: inductor, or a backend):

    .venv/bin/python benchmarks/dkv_cache.py --model zoo-fewshot --gen-length 5 --block 5 \
        --steps 5 --batches 8 --prompt-batches 64 --repeats 1 --threads 1 \
        --out benchmarks/results/block-cache/cpu-2core/dllm_caches_zoo_fewshot.json

On a GPU (``--device cuda --dtype bfloat16``) the random model can take LLaDA-8B's
per-layer shape (``--width 4096 --heads 32 --kv-heads 32 --intermediate 12288
--vocab 126464``); it is built directly on the device. Timings synchronise the
device before reading the clock.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import decodekit
import torch
from decodekit.pipelines.masked_diffusion import MaskedDiffusionLMPipeline


def llada_shaped(
    width: int,
    layers: int,
    vocab: int,
    seed: int = 0,
    *,
    heads: int | None = None,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """A random bidirectional Llama (LLaDA's layout), built on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=intermediate or int(width * 8 / 3),
        num_hidden_layers=layers,
        num_attention_heads=heads or width // 32,
        num_key_value_heads=kv_heads or max(1, width // 128),
        max_position_embeddings=2048,
        is_causal=False,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _pooled_ideal(ideals: list[float | None]) -> float | None:
    """One ideal speed-up for several prompt batches of about equal work: their harmonic
    mean (total baseline work over total cached work)."""
    if not ideals or any(v is None for v in ideals):
        return None
    return len(ideals) / sum(1.0 / v for v in ideals)


def machine(device: str, threads: int) -> str:
    if device.startswith("cuda"):
        return (
            f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}"
        )
    return f"{platform.processor() or platform.machine()}, CPU, {threads} thread(s), no GPU"


def parse_args() -> tuple[argparse.Namespace, argparse.ArgumentParser]:
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
    ap.add_argument(
        "--prompt-batches",
        type=int,
        default=4,
        help="--model zoo, zoo-fewshot: batches of held-out prompts per batch size",
    )
    ap.add_argument(
        "--skip-batches",
        type=int,
        default=0,
        help="--model zoo, zoo-fewshot: leave out the first this-many prompt batches (to measure "
        "further prompts: --prompt-batches 32 --skip-batches 16 runs prompts 128-255 at batch 8)",
    )
    ap.add_argument("--model", choices=["random", "zoo", "zoo-fewshot"], default="random")
    ap.add_argument(
        "--shots", type=int, default=32, help="--model zoo-fewshot: solved problems per prompt"
    )
    ap.add_argument(
        "--configs",
        nargs="+",
        default=None,
        help="run only these rows (baseline is always run); default: all",
    )
    ap.add_argument("--out", default="benchmarks/results/dkv-cache/cpu-2core/dkv_cache.json")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument(
        "--heads", type=int, default=None, help="random model: attention heads (width/32)"
    )
    ap.add_argument(
        "--kv-heads", type=int, default=None, help="random model: K/V heads (width/128)"
    )
    ap.add_argument(
        "--intermediate", type=int, default=None, help="random model: MLP width (8/3 width)"
    )
    ap.add_argument("--vocab", type=int, default=512, help="random model: vocabulary size")
    ap.add_argument(
        "--refresh-interval",
        type=int,
        nargs="+",
        default=[4],
        help="refresh_interval of the decode, greedy and pd rows; several give rows decode@N, ...",
    )
    ap.add_argument(
        "--block-refresh-steps",
        type=int,
        nargs="+",
        default=[1],
        help="block_refresh_steps of those rows (2: the reference code's schedule); values "
        "other than 1 give rows decode@N+r2, ...",
    )
    ap.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        help="compile the model call for every row (pipeline.compile: inductor, or a backend such "
        "as aot_eager; on CUDA also 'reduce-overhead', inductor with CUDA graphs); each row's "
        "warm-up is then a whole run and its time (warmup_s) the first-call compile cost",
    )
    ap.add_argument(
        "--baseline-batches",
        type=int,
        default=None,
        help="run the baseline on the first this-many prompt batches only: speed-up, agreement "
        "and changed answers are then over those paired batches (pair the other rows' tokens "
        "with a full baseline run's through --save-outputs)",
    )
    ap.add_argument(
        "--save-outputs",
        default=None,
        help="write every row's generated token ids (safetensors, one tensor per row) here",
    )
    ap.add_argument(
        "--query-bucket",
        type=int,
        default=None,
        help="query_bucket of every dkv-cache row (default: the strategy's, 16 on CUDA, 1 elsewhere)",
    )
    return ap.parse_args(), ap


def load(args: argparse.Namespace):
    """The pipeline, the held-out (prompt, answer) problems (zoo models, else None) and a
    description of the model."""
    dtype = getattr(torch, args.dtype)
    if args.model == "random":
        vocab = args.vocab
        model = llada_shaped(
            args.width,
            args.layers,
            vocab,
            heads=args.heads,
            kv_heads=args.kv_heads,
            intermediate=args.intermediate,
            device=args.device,
            dtype=dtype,
        )
        pipe = MaskedDiffusionLMPipeline(
            model, mask_token_id=vocab - 1, eos_token_id=2, pad_token_id=0
        )
        c = model.config
        described = (
            f"random LLaDA-shaped bidirectional Llama, width {c.hidden_size}, "
            f"{c.num_hidden_layers} layers, {c.num_attention_heads} heads / "
            f"{c.num_key_value_heads} K/V heads, MLP {c.intermediate_size}, vocab {vocab}, "
            f"{args.dtype}, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params"
        )
        return pipe, None, described
    from decodekit.pipelines.zoo import zoo_path
    from decodekit.pipelines.zoo.arith_data import held_out_few_shot, held_out_problems
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = "arith-mdlm" if args.model == "zoo" else "arith-mdlm-fewshot"
    model = AutoModelForCausalLM.from_pretrained(zoo_path(name), dtype=dtype)
    model = model.to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(zoo_path(name))
    pipe = MaskedDiffusionLMPipeline(model, tokenizer)
    count = max(args.batches) * args.prompt_batches
    if args.model == "zoo":
        problems = held_out_problems(count)
        described = "zoo:arith-mdlm; prompts: held-out sums (held_out_problems)"
    else:
        problems = held_out_few_shot(count, args.shots, padded=True)
        tokens = sum(len(tokenizer(p).input_ids) for p, _ in problems) / count
        described = (
            f"zoo:arith-mdlm-fewshot; prompts: zero-padded held-out sums after "
            f"{args.shots} solved problems (held_out_few_shot), {tokens:.0f} tokens on average"
        )
    return pipe, problems, described


def rows_to_run(args: argparse.Namespace, ap: argparse.ArgumentParser) -> dict[str, list]:
    """Row name -> strategy specs: baseline, the dkv-cache variants, threshold decoding."""
    cache = [{"name": "dkv-cache", "params": {"variant": "prefill"}}]
    configs = {"baseline": []}
    # one interval gives rows "decode", "greedy", ...; several give "decode@4", "decode@8", ...
    # and --block-refresh-steps other than 1 adds "+rN" ("decode@8+r2")
    several = len(args.refresh_interval) > 1
    for every in args.refresh_interval:
        for first in args.block_refresh_steps:
            tag = (f"@{every}" if several else "") + ("" if first == 1 else f"+r{first}")
            params = {"refresh_interval": every}
            if first != 1:
                params["block_refresh_steps"] = first
            for variant in ("decode", "greedy"):
                configs[variant + tag] = [
                    {"name": "dkv-cache", "params": {"variant": variant, **params}}
                ]
            if not tag:  # the rows' order with one interval: decode, greedy, prefill, pd
                configs["prefill"] = cache
            configs["pd" + tag] = [{"name": "dkv-cache", "params": {"variant": "pd", **params}}]
    configs.setdefault("prefill", cache)
    configs["threshold"] = [{"name": "parallel-threshold", "params": {"threshold": 0.9}}]
    for variant in ("decode", "greedy", "prefill", "pd"):  # each variant with threshold decoding
        configs[f"{variant}+threshold"] = [
            {"name": "dkv-cache", "params": {"variant": variant}},
            {"name": "parallel-threshold", "params": {"threshold": 0.9}},
        ]
    for mode in ("prefix", "dual"):  # Fast-dLLM's block caches, alone and with threshold
        configs[f"block-{mode}"] = [{"name": "block-cache", "params": {"mode": mode}}]
        configs[f"block-{mode}+threshold"] = [
            {"name": "block-cache", "params": {"mode": mode}},
            {"name": "parallel-threshold", "params": {"threshold": 0.9}},
        ]
    if args.query_bucket:
        for strategies in configs.values():
            for spec in strategies:
                if spec["name"] in ("dkv-cache", "block-cache"):
                    spec["params"]["query_bucket"] = args.query_bucket
    if args.configs:
        unknown = set(args.configs) - set(configs)
        if unknown:
            ap.error(f"unknown configs {sorted(unknown)}; choose from {sorted(configs)}")
        configs = {k: v for k, v in configs.items() if k == "baseline" or k in args.configs}
    return configs


def prompt_batches(args: argparse.Namespace, batch: int, problems) -> tuple[list, list | None]:
    """The inputs of each prompt batch of size ``batch``, and their answers (zoo models)."""
    if problems is not None:  # several batches of distinct held-out prompts
        kept = range(args.skip_batches, args.prompt_batches)
        inputs = [dict(prompt=[p for p, _ in problems[i * batch : (i + 1) * batch]]) for i in kept]
        answers = [[a for _, a in problems[i * batch : (i + 1) * batch]] for i in kept]
        return inputs, answers
    g = torch.Generator().manual_seed(batch)
    return [
        dict(input_ids=torch.randint(3, args.vocab - 1, (batch, args.prompt), generator=g))
    ], None


def timed(pipe, device: str, strategies: list, inputs: list, kw: dict):
    """Time ``inputs`` under ``strategies``: (seconds per input, outputs, ideal)."""
    secs, outs, ideal = [], [], None
    with contextlib.ExitStack() as stack:
        r = stack.enter_context(decodekit.attach(pipe, strategies)) if strategies else None
        for x in inputs:
            sync(device)
            start = time.perf_counter()
            outs.append(pipe(**x, **kw))
            sync(device)
            secs.append(time.perf_counter() - start)
    if r is not None:
        ideal = r.ideal_speedup()
    return secs, outs, ideal


def measure(args: argparse.Namespace, pipe, configs: dict[str, list], inputs: list):
    """Warm every row up, then time the rows interleaved. Returns each row's warm-up seconds,
    its time per repeat and (outputs, pooled ideal speed-up) of the last repeat."""
    gkw = dict(gen_length=args.gen_length, block_length=args.block, steps=args.steps)
    # Warm-up: every row once, on the first prompt batch (first calls pay one-time set-up
    # costs). On CUDA, and with --compile, a whole run, since every new query width costs
    # plan selection (or a compile) once; on the CPU one block is enough.
    warm = (
        gkw
        if args.device.startswith("cuda") or args.compile
        else dict(
            gen_length=args.block,
            block_length=args.block,
            steps=max(1, args.steps * args.block // args.gen_length),
        )
    )
    # the warm-up's own time: where it is a whole run, the first-call cost
    warmup = {
        name: sum(timed(pipe, args.device, strategies, inputs[:1], warm)[0])
        for name, strategies in configs.items()
    }
    # Timed runs, interleaved: each prompt batch goes through every row in turn, so a
    # slow drift of the machine's speed (minutes long on a shared VM) hits all rows
    # alike instead of whichever row ran during it. A row's time for one repeat is the
    # sum over its prompt batches.
    times = {k: [] for k in configs}
    outs, per_batch = {}, {}
    for _ in range(args.repeats):
        secs = {k: 0.0 for k in configs}
        per_row: dict[str, list] = {k: [] for k in configs}
        ideals: dict[str, list] = {k: [] for k in configs}
        batch_secs: dict[str, list] = {k: [] for k in configs}
        for i, x in enumerate(inputs):
            for name, strategies in configs.items():
                if name == "baseline" and i >= paired_batches(args, inputs):
                    continue
                t, out, ideal = timed(pipe, args.device, strategies, [x], gkw)
                secs[name] += t[0]
                per_row[name] += out
                ideals[name].append(ideal)
                batch_secs[name].append(t[0])
        for name in configs:
            times[name].append(secs[name])
            outs[name] = (per_row[name], _pooled_ideal(ideals[name]))
            per_batch[name] = batch_secs[name]
    return warmup, times, outs, per_batch


def paired_batches(args: argparse.Namespace, inputs: list) -> int:
    """How many prompt batches the baseline runs on (all but with --baseline-batches)."""
    return len(inputs) if args.baseline_batches is None else min(args.baseline_batches, len(inputs))


def answer_figures(args, batch: int, answers: list, out: list, baseline: list) -> dict:
    """Accuracy of a row's answers, and the answers that changed from the baseline's."""
    got = [t.strip() for o in out for t in o.texts]
    base = [t.strip() for o in baseline for t in o.texts]
    want = [a for group in answers for a in group][: len(got)]
    # answers that differ from the baseline's (where it ran), and which way they moved
    moved = [(b == w, g == w) for g, b, w in zip(got, base, want) if g != b]
    # which prompts (index into the prompt list), to compare rows and runs
    first = args.skip_batches * batch
    return {
        "accuracy": round(sum(g == w for g, w in zip(got, want)) / len(want), 3),
        "correct": sum(g == w for g, w in zip(got, want)),
        "prompts": len(want),
        "answers": got,
        "changed_prompts": [first + i for i, (g, b) in enumerate(zip(got, base)) if g != b],
        "answers_changed": len(moved),
        "right_to_wrong": sum(1 for was, now in moved if was and not now),
        "wrong_to_right": sum(1 for was, now in moved if now and not was),
    }


def batch_rows(
    args, batch: int, inputs: list, answers, warmup, times, outs, per_batch
) -> list[dict]:
    """One result row per config at this batch size (times, speed-up, work, agreement)."""
    base_t = statistics.median(times["baseline"])
    base_seq = torch.cat([o.sequences for o in outs["baseline"][0]])
    generated = batch * args.gen_length * len(inputs)
    paired = paired_batches(args, inputs)
    rows = []
    for name, (out, ideal) in outs.items():
        t = statistics.median(times[name])
        seqs = torch.cat([o.sequences for o in out])
        # speed-up: over the batches the baseline ran too (all of them unless --baseline-batches)
        speedup = base_t / t if paired == len(inputs) else base_t / sum(per_batch[name][:paired])
        row = {
            "batch": batch,
            "config": name,
            "median_s": round(t, 3),
            "times_s": [round(x, 3) for x in times[name]],
            "batch_times_s": [round(x, 3) for x in per_batch[name]],
            "warmup_s": round(warmup[name], 3),
            "tokens_per_s": round(generated / t, 1),
            "speedup": round(speedup, 2),
            "paired_batches": paired,
            "nfe": sum(o.nfe for o in out) / len(out),
            "tokens_computed": sum(sum(o.tokens_computed) for o in out) / len(out),
            "ideal_speedup": None if ideal is None else round(ideal, 2),
        }
        seqs = seqs[: len(base_seq)]  # the rows the baseline ran too
        row["token_agreement"] = round(float((seqs == base_seq).double().mean()), 3)
        row["tokens_differing"] = int((seqs != base_seq).sum())
        if answers is not None:
            row.update(answer_figures(args, batch, answers, out, outs["baseline"][0]))
        rows.append(row)
    return rows


def generated_ids(args, outs) -> dict[str, torch.Tensor]:
    """Each row's generated token ids (the last gen_length columns), for --save-outputs."""
    return {
        name: torch.cat([o.sequences for o in out])[:, -args.gen_length :].to("cpu", torch.int32)
        for name, (out, _) in outs.items()
    }


def compile_counters() -> dict:
    """What dynamo and inductor counted over the run (--compile): graphs compiled, graph
    breaks and, with 'reduce-overhead', the graphs CUDA graphs refused (cudagraph_skips;
    the reasons are in the log with TORCH_LOGS=cudagraphs)."""
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "graph_break_reasons": sorted(counters["graph_break"])[:20],
        "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else None,
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
    }


def main() -> None:
    args, ap = parse_args()
    torch.set_num_threads(args.threads)
    pipe, problems, described = load(args)
    configs = rows_to_run(args, ap)
    if args.compile:
        from decodekit.compiling import compile_pipeline

        mode = args.compile
        if mode == "reduce-overhead":  # inductor with CUDA graphs (the in-place cache writes too)
            pipe.model.compile(mode="reduce-overhead")
        else:
            compile_pipeline(pipe, "masked-diffusion-lm", mode)
    saved = {}
    results = {
        "machine": machine(args.device, args.threads),
        "args": vars(args),
        "model": described,
        "rows": [],
    }
    for batch in args.batches:
        inputs, answers = prompt_batches(args, batch, problems)
        warmup, times, outs, per_batch = measure(args, pipe, configs, inputs)
        for row in batch_rows(args, batch, inputs, answers, warmup, times, outs, per_batch):
            results["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "answers"}), flush=True)
        if args.save_outputs:
            saved.update({f"{name}/b{batch}": t for name, t in generated_ids(args, outs).items()})
    if args.compile:
        results["compile_counters"] = compile_counters()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    if args.save_outputs:
        from safetensors.torch import save_file

        save_file(saved, args.save_outputs)


if __name__ == "__main__":
    main()
