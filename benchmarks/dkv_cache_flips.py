"""Where the answers a dkv-cache row changed were decided, and how sure the baseline was.

Reads the prompts a row of ``benchmarks/dkv_cache.py --model zoo-fewshot`` changed
(``changed_prompts``), reruns the baseline on the batches holding them while recording
every step's commits, and for each prompt of those batches reports, per answer
position (generated columns 0-3, the digits, and 4, the first ``<eos>``), the block
step that committed it and the baseline's top-1 probability and its margin over the
second, from a full forward on the sequence just before that commit.

    .venv/bin/python benchmarks/dkv_cache_flips.py \
        --rows benchmarks/results/dkv-cache/cpu-2core/dkv_cache_fewshot_control.json --config decode@8 \
        --out benchmarks/results/dkv-cache/cpu-2core/dkv_cache_fewshot_flips.json

``--rerun-cached`` also runs the row's cache on those batches and reports, per changed
prompt, the cached answer and the first answer digit that differs from the baseline's,
with the block step at which the baseline committed that digit.
"""

from __future__ import annotations

import argparse
import json
import statistics

import decodekit
import torch
from decodekit.pipelines.masked_diffusion import MaskedDiffusionLMPipeline
from decodekit.testing import CommitRecorder

ANSWER_COLUMNS = 5  # four zero-padded digits, then <eos>


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", required=True, help="a dkv_cache.py --model zoo-fewshot JSON")
    ap.add_argument("--config", default="decode@8")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--rerun-cached",
        action="store_true",
        help="also rerun the row's dkv-cache config on those batches, and report each changed "
        "prompt's cached answer and the first answer digit that differs",
    )
    return ap.parse_args()


def commit_figures(pipe, model, pad_id: int, rec: CommitRecorder, a: dict, rows: int):
    """Per row, per answer column: the block step that committed it, and the baseline's top-1
    probability and margin over the second from a full forward just before that commit."""
    steps_per_block = a["steps"] * a["block"] // a["gen_length"]
    length = rec.steps[0][1].shape[1]
    start = length - a["gen_length"]
    found: list[dict[int, dict]] = [{} for _ in range(rows)]
    for step, x, committed in rec.steps:
        hits = committed[:, start : start + ANSWER_COLUMNS].nonzero().tolist()
        if not hits:
            continue
        before = x.clone()
        before[committed] = pipe.mask_token_id
        # the pipeline's own attention mask and positions: left padding, then 1s
        real = (before != pad_id).long().cummax(dim=1).values
        positions = (real.cumsum(dim=1) - 1).clamp(min=0)
        with torch.no_grad():
            probs = model(input_ids=before, attention_mask=real, position_ids=positions)
            probs = probs.logits.softmax(-1)
        for r, c in hits:
            top = probs[r, start + c].topk(2).values.tolist()
            found[r][c] = {
                "block_step": step % steps_per_block,
                "p_top": round(top[0], 3),
                "margin": round(top[0] - top[1], 3),
            }
    return found


def prompt_entry(index: int, changed: set, base_text: str, want, found: dict, cached_text) -> dict:
    """One prompt's answer columns and digit margins (and, rerun, its cached answer)."""
    digits = [found[c] for c in range(4)]
    entry = {
        "prompt": index,
        "changed": index in changed,
        "baseline_answer": base_text.strip(),
        "right_answer": want,
        "columns": {str(c): found[c] for c in sorted(found)},
        "min_digit_margin": min(d["margin"] for d in digits),
        "digit_block_steps": sorted(d["block_step"] for d in digits),
    }
    if cached_text is not None and index in changed:
        cached, base = cached_text.strip(), base_text.strip()
        first = next((c for c in range(4) if cached[c : c + 1] != base[c]), None)
        entry["cached_answer"] = cached
        entry["first_differing_digit"] = first
        if first is not None:
            entry["its_block_step"] = found[first]["block_step"]
    return entry


def summarise(prompts_out: list[dict]) -> dict:
    """Digit margins and block steps of the changed prompts and of the unchanged ones."""
    summary = {}
    for label, flag in (("changed", True), ("unchanged", False)):
        sel = [p for p in prompts_out if p["changed"] == flag]
        summary[label] = {
            "prompts": len(sel),
            "median_min_digit_margin": statistics.median(p["min_digit_margin"] for p in sel),
            "min_digit_margin_at_least_0.95": sum(p["min_digit_margin"] >= 0.95 for p in sel),
            "digit_block_steps_seen": sorted({s for p in sel for s in p["digit_block_steps"]}),
        }
    return summary


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    bench = json.load(open(args.rows))
    row = next(r for r in bench["rows"] if r["config"] == args.config)
    changed = set(row["changed_prompts"])
    a = bench["args"]
    batch = a["batches"][0]

    from decodekit.pipelines.zoo import zoo_path
    from decodekit.pipelines.zoo.arith_data import held_out_few_shot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(zoo_path("arith-mdlm-fewshot")).eval()
    tokenizer = AutoTokenizer.from_pretrained(zoo_path("arith-mdlm-fewshot"))
    pipe = MaskedDiffusionLMPipeline(model, tokenizer)
    problems = held_out_few_shot(batch * a["prompt_batches"], a["shots"], padded=True)
    gkw = dict(gen_length=a["gen_length"], block_length=a["block"], steps=a["steps"])
    prompts_out = []
    for b in sorted({i // batch for i in changed}):
        group = problems[b * batch : (b + 1) * batch]
        prompts = [p for p, _ in group]
        rec = CommitRecorder()
        with decodekit.attach(pipe, [rec]):
            out = pipe(prompt=prompts, **gkw)
        cached_texts = [None] * len(group)
        if args.rerun_cached:
            with decodekit.attach(pipe, [dkv_config(args.config, a)]):
                cached_texts = pipe(prompt=prompts, **gkw).texts
        found = commit_figures(pipe, model, tokenizer.pad_token_id, rec, a, len(group))
        for r, (_, want) in enumerate(group):
            prompts_out.append(
                prompt_entry(b * batch + r, changed, out.texts[r], want, found[r], cached_texts[r])
            )
    summary = summarise(prompts_out)
    result = {"rows": args.rows, "config": args.config, "summary": summary, "prompts": prompts_out}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(summary, indent=1))


def dkv_config(name: str, bench_args: dict) -> dict:
    """The dkv-cache strategy of a benchmark row: ``decode@8``, ``pd@4+r2``, or ``decode``
    (a run with one ``--refresh-interval``)."""
    variant, _, rest = name.partition("@")
    every, _, extra = rest.partition("+r")
    interval = int(every) if every else bench_args["refresh_interval"][0]
    params = {"variant": variant, "refresh_interval": interval}
    if extra:
        params["block_refresh_steps"] = int(extra)
    return {"name": "dkv-cache", "params": params}


if __name__ == "__main__":
    main()
