"""Build `arith-ngram`: the token n-gram model of the arith corpus that superposed decoding reads.

    python -m decodekit.pipelines.zoo.build_arith_ngram --out DIR [--texts N] [--seed S]

The texts come from the same generator that trained arith-ar, tokenized with
arith-ar's tokenizer; counts of orders 2–6 are stored as safetensors arrays.
"""

from __future__ import annotations

import argparse
import itertools
import random
from pathlib import Path


def build(out: Path, num_texts: int = 20000, seed: int = 0) -> Path:
    """Count n-grams of ``num_texts`` arith training texts and save them to ``out``."""
    from decodekit.pipelines.zoo import zoo_path
    from decodekit.pipelines.zoo.arith_data import training_texts
    from decodekit.plugins.ngram import build_from_texts
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(zoo_path("arith-ar"))
    texts = list(itertools.islice(training_texts(random.Random(seed)), num_texts))
    model = build_from_texts(texts, tokenizer, max_order=6, name="zoo:arith-ar")
    return model.save(out)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: build the n-gram model into ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--texts", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build(args.out, args.texts, args.seed))


if __name__ == "__main__":
    main()
