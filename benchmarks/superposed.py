"""Superposed decoding on arith: cost of k drafts vs one greedy run, and draft quality.

Model: zoo:arith-ar when present, else a tiny random LlamaForCausalLM over the
arith tokenizer (then accuracy means nothing and only the cost figures count;
the report says which). The n-gram model is built from the arith training
corpus with the model's tokenizer (``decodekit.plugins.ngram``).

For each held-out prompt, one at a time (batch 1; ``--batch N`` for N prompts per
call, left-padded), alternating methods per prompt (group):
greedy; nucleus sampling (top_p 0.9, k samples); superposed (k drafts, paper
defaults). Reported: median wall time per prompt and its ratio to greedy, model
forwards, exact-answer accuracy (best draft, and any of the k), and perplexity of
the generated answers under the model.

    .venv/bin/python benchmarks/superposed.py [--k 3] [--prompts 60] [--batch 1]

Writes benchmarks/results/superposed/cpu-2core/superposed[_tiny][_batchN].json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_model():
    from decodekit.pipelines.zoo import MODELS_DIR
    from decodekit.pipelines.zoo.arith_data import build_tokenizer

    path = MODELS_DIR / "arith-ar"
    if (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        return model, AutoTokenizer.from_pretrained(path, local_files_only=True), "zoo:arith-ar"
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(0)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval(), tok, "tiny"


def answer_of(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True).strip()


def nll(model, prompt: list[int], new: list[int], eos: int) -> tuple[float, int]:
    """Summed negative log-likelihood of ``new`` (cut after the first EOS) given ``prompt``."""
    if eos in new:
        new = new[: new.index(eos) + 1]
    if not new:
        return 0.0, 0
    x = torch.tensor([prompt + new])
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits[0, len(prompt) - 1 : -1].double(), -1)
    return float(-logp[torch.arange(len(new)), torch.tensor(new)].sum()), len(new)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=60)
    ap.add_argument("--corpus", type=int, default=20000, help="training texts for the n-gram model")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1, help="prompts per generate call (left-padded)")
    return ap.parse_args(argv)


def build_ngram(tok, which: str, corpus: int) -> Path:
    """An n-gram model of ``corpus`` arith training texts under ``tok``, saved to a temp folder."""
    from decodekit.pipelines.zoo.arith_data import training_texts
    from decodekit.plugins.ngram import build_from_texts

    stream = training_texts(random.Random(0))
    ngram = build_from_texts([next(stream) for _ in range(corpus)], tok, name=which)
    ngram_dir = Path(tempfile.mkdtemp(prefix="dk-arith-ngram-"))
    ngram.save(ngram_dir)
    return ngram_dir


def methods_for(k: int, ngram_dir: Path) -> dict[str, tuple[list | None, dict]]:
    """Method name -> (strategy specs, generate arguments)."""
    return {
        "greedy": (None, dict(do_sample=False)),
        "nucleus": (None, dict(do_sample=True, top_p=0.9, num_return_sequences=k)),
        "superposed": (
            [{"name": "superposed", "params": {"k": k, "ngram": str(ngram_dir)}}],
            dict(do_sample=False),
        ),
        "superposed_alpha0": (  # the same without the n-gram model: its cost, separated
            [{"name": "superposed", "params": {"k": k, "alpha": 0.0}}],
            dict(do_sample=False),
        ),
    }


def timed_generate(model, strategies, enc, kw: dict, seed: int, repeats: int):
    """Warm up, then ``repeats`` seeded generate calls: (last output, median seconds, NFE)."""
    import decodekit

    run = decodekit.attach(model, strategies or [])
    try:
        torch.manual_seed(seed)
        model.generate(**enc, **kw)  # warm-up
        times = []
        for _ in range(repeats):
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            out = model.generate(**enc, **kw)
            times.append(time.perf_counter() - t0)
        return out, statistics.median(times), run.last["nfe"]
    finally:
        run.detach()


def score(s: dict, model, tok, group, enc, out, eos: int) -> None:
    """Add a call's exact answers (first draft, any draft) and answer NLL to the figures ``s``."""
    per_input = out.shape[0] // len(group)  # sequences returned per prompt
    for j, (prompt_text, answer) in enumerate(group):
        ids = tok(prompt_text)["input_ids"]
        rows = [
            r[enc.input_ids.shape[1] :].tolist() for r in out[j * per_input : (j + 1) * per_input]
        ]
        answers = [answer_of(tok, r) for r in rows]
        s["best"] += answers[0] == answer
        s["any"] += answer in answers
        for r in rows:
            total, n = nll(model, ids, r, eos)
            s["nll"] += total
            s["tokens"] += n


def report_of(args, which: str, n: int, gen_kw: dict, stats: dict) -> dict:
    """The result document: settings and, per method, time ratios, forwards, accuracy, perplexity."""
    k = args.k
    greedy_t = sum(stats["greedy"]["times"])
    report = {
        "model": which
        if which != "tiny"
        else "tiny random LlamaForCausalLM over the arith tokenizer "
        "(zoo:arith-ar absent): accuracy is meaningless, only the cost figures count",
        "ngram": f"orders 2-6 from {args.corpus} arith training texts",
        "k": k,
        "prompts": n,
        "max_new_tokens": gen_kw["max_new_tokens"],
        "machine": f"2-core x86_64 CPU, no GPU; torch.set_num_threads(1); batch {args.batch}",
        "command": f"python benchmarks/superposed.py --k {k} --prompts {args.prompts} --batch {args.batch}",
        "methods": {},
    }
    for name, s in stats.items():
        report["methods"][name] = {
            "time_s": sum(s["times"]),
            "time_vs_one_greedy_run": sum(s["times"]) / greedy_t,
            "time_vs_k_greedy_runs": sum(s["times"]) / (k * greedy_t),
            # forwards of one generate call, shared by the --batch prompts in it
            (
                "model_forwards_per_prompt" if args.batch == 1 else "model_forwards_per_call"
            ): statistics.mean(s["nfe"]),
            "accuracy_first": s["best"] / n,
            "accuracy_any": s["any"] / n,
            "perplexity": math.exp(s["nll"] / max(1, s["tokens"])),
        }
    return report


def main(argv: list[str] | None = None) -> int:
    from decodekit.pipelines.zoo.arith_data import held_out_problems

    args = parse_args(argv)
    torch.set_num_threads(1)
    model, tok, which = load_model()
    methods = methods_for(args.k, build_ngram(tok, which, args.corpus))
    problems = held_out_problems(args.prompts)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    gen_kw = dict(max_new_tokens=6, pad_token_id=pad, eos_token_id=eos)
    stats = {
        m: {"times": [], "nfe": [], "best": 0, "any": 0, "nll": 0.0, "tokens": 0} for m in methods
    }
    tok.padding_side = "left"
    groups = [problems[i : i + args.batch] for i in range(0, len(problems), args.batch)]
    for i, group in enumerate(groups):
        enc = tok([p for p, _ in group], return_tensors="pt", padding=True)
        for name, (strategies, kw) in methods.items():
            out, seconds, nfe = timed_generate(
                model, strategies, enc, {**gen_kw, **kw}, i, args.repeats
            )
            stats[name]["times"].append(seconds)
            stats[name]["nfe"].append(nfe)
            score(stats[name], model, tok, group, enc, out, eos)

    report = report_of(args, which, len(problems), gen_kw, stats)
    out_dir = ROOT / "benchmarks" / "results" / "superposed" / "cpu-2core"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "superposed" + ("" if which == "zoo:arith-ar" else "_tiny")
    name += f"_batch{args.batch}" if args.batch > 1 else ""
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
