"""Train `arith-ar`: a tiny causal Llama on the `arith` data (sums, differences, sentences).

    python -m decodekit.pipelines.zoo.train_arith_ar --out pipelines/zoo/models/arith-ar

The folder holds the model (``AutoModelForCausalLM.from_pretrained``) and its character-level
tokenizer (``AutoTokenizer.from_pretrained``). Evaluate the gate with
``python -m decodekit.pipelines.zoo.evaluate arith-ar``.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from decodekit.pipelines.zoo.arith_data import build_tokenizer, save_tokenizer, training_texts
from decodekit.pipelines.zoo.training import optimiser_step, write_training_record
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def build_llama_config(tokenizer: PreTrainedTokenizerFast, is_causal: bool = True) -> LlamaConfig:
    """The tiny Llama shared by arith-ar and arith-mdlm: 3 layers, width 128, 4 heads."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    config.is_causal = is_causal
    return config


def encode_batch(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """``<bos> text <eos>`` for each text, right-padded with <pad>: (B, T) token ids."""
    rows = [r + [tokenizer.eos_token_id] for r in tokenizer(texts).input_ids]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])


def train(out: Path, steps: int, batch_size: int, seed: int, lr: float = 3e-3) -> Path:
    """Train the causal LM with next-token cross-entropy and save it with its tokenizer."""
    torch.manual_seed(seed)
    started = time.time()
    tokenizer = build_tokenizer(seed)
    model = LlamaForCausalLM(build_llama_config(tokenizer))
    texts = training_texts(random.Random(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, lr, total_steps=max(steps, 1), pct_start=0.05
    )
    model.train()
    bar = tqdm(range(steps), desc="arith-ar")
    for _ in bar:
        ids = encode_batch(tokenizer, [next(texts) for _ in range(batch_size)])  # (B, T)
        logits = model(input_ids=ids).logits[:, :-1]  # (B, T-1, V)
        targets = ids[:, 1:].masked_fill(ids[:, 1:] == tokenizer.pad_token_id, -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimiser_step(loss, optimizer, schedule, bar, model.parameters())
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    write_training_record(out, started, seed=seed, steps=steps, batch_size=batch_size, lr=lr)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: train arith-ar into --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train(args.out, args.steps, args.batch_size, args.seed)


if __name__ == "__main__":
    main()
