"""Train `arith-mdlm`: a bidirectional Llama as a masked diffusion LM, LLaDA-style.

Large Language Diffusion Models (Nie et al., 2025), arXiv:2502.09992: sample t ~ U(0, 1),
mask each answer (or sentence) token with probability t, and minimise the cross-entropy on
the masked positions weighted by 1/t. Prompts ("417+85=") are never masked; every answer is
padded with <eos> to a fixed window of `ANSWER_LENGTH` tokens, as LLaDA pads its answers.

    python -m decodekit.pipelines.zoo.train_arith_mdlm --out pipelines/zoo/models/arith-mdlm
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from decodekit.pipelines.zoo.arith_data import (
    ANSWER_LENGTH,
    build_tokenizer,
    random_problem,
    random_sentence,
    save_tokenizer,
)
from decodekit.pipelines.zoo.train_arith_ar import build_llama_config
from decodekit.pipelines.zoo.training import optimiser_step, write_training_record
from tqdm import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

MIN_MASK_RATE = 1e-3


def masked_diffusion_batch(
    tokenizer: PreTrainedTokenizerFast,
    rng: random.Random,
    batch_size: int,
    sentence_fraction: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean sequences (B, T) and which positions may be masked (B, T) bool; pads excluded."""
    rows, maskable = [], []
    for _ in range(batch_size):
        if rng.random() < sentence_fraction:
            ids = tokenizer(random_sentence(rng)).input_ids + [tokenizer.eos_token_id]
            flags = [False] + [True] * (len(ids) - 1)  # everything but <bos>
        else:
            prompt, answer = random_problem(rng)
            prompt_ids = tokenizer(prompt).input_ids
            answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
            answer_ids += [tokenizer.eos_token_id] * (ANSWER_LENGTH - len(answer_ids))
            ids = prompt_ids + answer_ids
            flags = [False] * len(prompt_ids) + [True] * ANSWER_LENGTH
        rows.append(ids)
        maskable.append(flags)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    flags = torch.tensor([f + [False] * (width - len(f)) for f in maskable])
    return ids, flags


def train(out: Path, steps: int, batch_size: int, seed: int, lr: float = 3e-3) -> Path:
    """Train the masked diffusion LM and save it with its tokenizer."""
    torch.manual_seed(seed)
    started = time.time()
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    tokenizer = build_tokenizer(seed)
    model = LlamaForCausalLM(build_llama_config(tokenizer, is_causal=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, lr, total_steps=max(steps, 1), pct_start=0.05
    )
    model.train()
    bar = tqdm(range(steps), desc="arith-mdlm")
    for _ in bar:
        clean, maskable = masked_diffusion_batch(tokenizer, rng, batch_size)  # (B, T) each
        t = MIN_MASK_RATE + (1 - MIN_MASK_RATE) * torch.rand(len(clean), 1, generator=generator)
        masked = maskable & (torch.rand(clean.shape, generator=generator) < t)  # (B, T)
        noisy = clean.masked_fill(masked, tokenizer.mask_token_id)
        attention_mask = (clean != tokenizer.pad_token_id).long()
        logits = model(input_ids=noisy, attention_mask=attention_mask).logits  # (B, T, V)
        token_loss = F.cross_entropy(logits.transpose(1, 2), clean, reduction="none")  # (B, T)
        loss = (token_loss * masked / t).sum() / maskable.sum()
        optimiser_step(loss, optimizer, schedule, bar, model.parameters())
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    write_training_record(
        out,
        started,
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        answer_length=ANSWER_LENGTH,
    )
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: train arith-mdlm into --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train(args.out, args.steps, args.batch_size, args.seed)


if __name__ == "__main__":
    main()
