"""What the n-gram rescoring of superposed decoding costs a step, on zoo:arith-ar with zoo:arith-ngram.

Two timings of ``NGramModel.interpolate``, each for the small-vocabulary tables
(the default here) and for the per-order look-up they replaced (``--path orders``
forces it):

- in the loop: ``perf_counter`` around every call during superposed generation of
  held-out sums, one prompt at a time (the model's forward runs between calls);
- alone: ``timeit`` on contexts from the arith corpus, for 3 and 48 rows (k = 3
  drafts of 1 and of 16 prompts).

    .venv/bin/python benchmarks/superposed_ngram_cost.py [--prompts 60]
"""

from __future__ import annotations

import argparse
import random
import time
import timeit

import decodekit
import torch
from decodekit.pipelines.zoo import zoo_path
from decodekit.pipelines.zoo.arith_data import held_out_problems, training_texts
from decodekit.plugins.ngram import NGramModel
from decodekit.plugins.superposed import _load_ngram
from transformers import AutoModelForCausalLM, AutoTokenizer

WEIGHTS = (0.01, 0.04, 0.15, 0.18, 0.12)


def in_loop(model, tok, prompts: int, repeats: int) -> tuple[float, int]:
    """Mean µs per interpolate call during generation, and the calls per pass."""
    spent, calls = [0.0], [0]
    real = NGramModel.interpolate

    def timed(self, *args):
        start = time.perf_counter()
        out = real(self, *args)
        spent[0] += time.perf_counter() - start
        calls[0] += 1
        return out

    encs = [tok([p], return_tensors="pt") for p, _ in held_out_problems(prompts)]
    kw = dict(
        max_new_tokens=6,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        do_sample=False,
    )
    params = {"k": 3, "ngram": "zoo:arith-ngram"}
    with decodekit.attach(model, [{"name": "superposed", "params": params}]):
        for e in encs:  # warm-up: tables built, code paths taken once
            model.generate(**e, **kw)
        NGramModel.interpolate = timed
        try:
            for _ in range(repeats):
                for e in encs:
                    model.generate(**e, **kw)
        finally:
            NGramModel.interpolate = real
    return spent[0] / calls[0] * 1e6, calls[0] // repeats


def alone(ngram: NGramModel, tok, rows: int) -> float:
    """µs per interpolate call on ``rows`` corpus contexts of 12 tokens, 9 candidates each."""
    texts = training_texts(random.Random(0))
    ctx = torch.tensor([(tok(next(texts))["input_ids"] * 3)[:12] for _ in range(rows)])
    cand = torch.randint(0, ngram.vocab_size, (rows, 9), generator=torch.Generator().manual_seed(0))
    lens = torch.full((rows,), 12)
    ngram.interpolate(ctx, cand, WEIGHTS, lens)
    n = 2000
    return timeit.timeit(lambda: ngram.interpolate(ctx, cand, WEIGHTS, lens), number=n) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(zoo_path("arith-ar")).eval()
    tok = AutoTokenizer.from_pretrained(zoo_path("arith-ar"))
    ngram = _load_ngram("zoo:arith-ngram")  # the instance the strategy uses
    real_tables = NGramModel._small_tables
    for path in ("tables", "orders"):
        if path == "orders":  # the per-order look-up, as before the tables
            NGramModel._small_tables = lambda self, weights: None
        try:
            loop_us, calls = in_loop(model, tok, args.prompts, args.repeats)
            print(
                f"{path}: in the loop {loop_us:.0f} us a call ({calls} calls per pass); "
                f"alone {alone(ngram, tok, 3):.1f} us for 3 rows, {alone(ngram, tok, 48):.1f} us "
                "for 48 rows"
            )
        finally:
            NGramModel._small_tables = real_tables


if __name__ == "__main__":
    main()
