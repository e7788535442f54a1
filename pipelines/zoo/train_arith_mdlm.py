"""Train `arith-mdlm`: a bidirectional Llama as a masked diffusion LM, LLaDA-style.

Large Language Diffusion Models (Nie et al., 2025), arXiv:2502.09992: mask a random
fraction t of the answer (or sentence) tokens and minimise the cross-entropy on the masked
positions weighted by 1/t. Prompts ("417+85=") are never masked; every answer is padded
with <eos> to its window — `ANSWER_LENGTH` tokens, and in a fraction of the batches a
longer window — as LLaDA pads its answers, so the model also fills long windows.

Two choices make it train in minutes rather than hours:

* **Initialised from arith-ar**, as Dream and DiffuLLaMA adapt autoregressive models into
  diffusion LMs: the same weights with ``config.is_causal = False``, then trained to predict
  the token at each masked position (no logit shift). From scratch the same model needs
  12000 steps for 75.6%; from arith-ar it passes 80% within 2000.
* **The number of masked tokens is uniform** on 1..n for a window of n maskable tokens
  (loss weight n/k = 1/t), the discrete form of t ~ U(0, 1): every state the decoder meets
  (k of n still masked) is trained equally often, and no example draws zero masks.

    python -m decodekit.pipelines.zoo.train_arith_mdlm --out pipelines/zoo/models/arith-mdlm

It reads zoo:arith-ar (``--init-from`` to use another folder); train that one first when
retraining both.
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
    random_sentence,
    save_tokenizer,
    solved_problems,
)
from decodekit.pipelines.zoo.training import optimiser_step, write_training_record
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

LONG_BATCH_EVERY = 4  # every 4th batch pads its answers to windows of up to `max_window`
LONG_BATCH_DIVISOR = 4  # ... with a quarter of the rows, to keep its cost near a short batch's
MAX_WINDOW = 256  # LLaDA's usual generation length; positions past it were never trained
CONTEXT_MAX_POSITIONS = 1024  # the stated length of a model trained with few-shot contexts


def masked_diffusion_batch(
    tokenizer: PreTrainedTokenizerFast,
    rng: random.Random,
    batch_size: int,
    sentence_fraction: float = 0.15,
    long_windows: bool = False,
    max_window: int = MAX_WINDOW,
    context_shots: int = 0,
    context_answer_fraction: float = 0.5,
    zero_pad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean sequences (B, T) and which positions may be masked (B, T) bool; pads excluded.

    With `long_windows`, each problem pads its answer with <eos> to a window drawn from
    ``ANSWER_LENGTH..max_window`` instead of ``ANSWER_LENGTH``, so that the model also
    fills long generation windows (as LLaDA's answers are padded to the whole window).
    With `context_shots` > 0, each problem's prompt follows a few-shot context of
    U{0..context_shots} solved problems, token for token what `with_context` writes. In a
    `context_answer_fraction` of those rows the context's answers may be masked too, so
    every solved problem in the row trains "answer from your own operands"; in the rest
    only the last answer is, as at inference. `zero_pad` writes every problem
    `zero_padded` ("417+085=0502").
    """
    rows, maskable = [], []
    for _ in range(batch_size):
        if rng.random() < sentence_fraction:
            ids = tokenizer(random_sentence(rng)).input_ids + [tokenizer.eos_token_id]
            flags = [False] + [True] * (len(ids) - 1)  # everything but <bos>
        else:
            context_ids, context_flags = [], []
            if context_shots:
                context_ids, context_flags = _context(
                    tokenizer, rng, rng.randint(0, context_shots), context_answer_fraction, zero_pad
                )
            ((prompt, answer),) = solved_problems(rng, 1, zero_pad)
            prompt_ids = tokenizer(prompt).input_ids  # <bos> first
            answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
            window = rng.randint(ANSWER_LENGTH, max_window) if long_windows else ANSWER_LENGTH
            answer_ids += [tokenizer.eos_token_id] * (window - len(answer_ids))
            ids = prompt_ids[:1] + context_ids + prompt_ids[1:] + answer_ids
            flags = [False] + context_flags + [False] * (len(prompt_ids) - 1) + [True] * window
        rows.append(ids)
        maskable.append(flags)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    flags = torch.tensor([f + [False] * (width - len(f)) for f in maskable])
    return ids, flags


def _context(
    tokenizer: PreTrainedTokenizerFast,
    rng: random.Random,
    shots: int,
    answer_fraction: float,
    zero_pad: bool = False,
) -> tuple[list[int], list[bool]]:
    """Token ids of `shots` solved problems, each followed by a space, and which are maskable."""
    maskable_answers = rng.random() < answer_fraction
    ids, flags = [], []
    for prompt, answer in solved_problems(rng, shots, zero_pad):
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        answer_ids = tokenizer(answer + " ", add_special_tokens=False).input_ids
        ids += prompt_ids + answer_ids
        flags += [False] * len(prompt_ids) + [maskable_answers] * (len(answer_ids) - 1) + [False]
    return ids, flags


def uniform_count_mask(
    maskable: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask k ~ U{1..n} of each row's n maskable positions: (masked (B, T) bool, weight (B, 1) = n/k)."""
    n = maskable.sum(dim=1, keepdim=True)  # (B, 1)
    k = (torch.rand(n.shape, generator=generator) * n).floor() + 1  # (B, 1), 1..n
    score = torch.rand(maskable.shape, generator=generator).masked_fill(~maskable, 2.0)
    rank = score.argsort(dim=1).argsort(dim=1)  # (B, T): a random order of the maskable positions
    return maskable & (rank < k), n / k


def load_initial_model(folder: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """arith-ar's weights and tokenizer, with bidirectional attention."""
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"arith-mdlm starts from arith-ar, but {folder} holds no model; train it first with "
            "`python -m decodekit.pipelines.zoo.train_arith_ar --out <folder>` and pass --init-from"
        )
    config = AutoConfig.from_pretrained(folder)
    config.is_causal = False
    model = LlamaForCausalLM.from_pretrained(folder, config=config)
    return model, AutoTokenizer.from_pretrained(folder)


def train(
    out: Path,
    steps: int,
    batch_size: int,
    seed: int,
    lr: float = 1e-3,
    init_from: Path | None = None,
    context_shots: int = 0,
    context_answer_fraction: float = 0.5,
    save_every: int = 0,
    zero_pad: bool = False,
) -> Path:
    """Train the masked diffusion LM from arith-ar and save it with its tokenizer.

    `context_shots` > 0 puts few-shot contexts before the problems (`masked_diffusion_batch`);
    `arith-mdlm-fewshot` is arith-mdlm trained further that way, in three runs (docs/zoo.md).
    """
    from decodekit.pipelines.zoo import zoo_path

    torch.manual_seed(seed)
    started = time.time()
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    init_from = Path(init_from) if init_from is not None else zoo_path("arith-ar")
    model, tokenizer = load_initial_model(init_from)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, lr, total_steps=max(steps, 1), pct_start=0.05
    )
    model.train()
    bar = tqdm(range(steps), desc="arith-mdlm")
    for step in bar:
        long_windows = step % LONG_BATCH_EVERY == LONG_BATCH_EVERY - 1
        rows = max(1, batch_size // LONG_BATCH_DIVISOR) if long_windows else batch_size
        clean, maskable = masked_diffusion_batch(
            tokenizer,
            rng,
            rows,
            long_windows=long_windows,
            context_shots=context_shots,
            context_answer_fraction=context_answer_fraction,
            zero_pad=zero_pad,
        )  # (B, T) each
        masked, weight = uniform_count_mask(maskable, generator)  # (B, T), (B, 1)
        noisy = clean.masked_fill(masked, tokenizer.mask_token_id)
        attention_mask = (clean != tokenizer.pad_token_id).long()
        logits = model(input_ids=noisy, attention_mask=attention_mask).logits  # (B, T, V)
        token_loss = F.cross_entropy(logits.transpose(1, 2), clean, reduction="none")  # (B, T)
        loss = (token_loss * masked * weight).sum() / maskable.sum()
        optimiser_step(loss, optimizer, schedule, bar, model.parameters())
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            checkpoint = out / f"checkpoint-{step + 1}"
            model.save_pretrained(checkpoint, safe_serialization=True)
            save_tokenizer(tokenizer, checkpoint)  # so evaluate --folder can read it alone
    model.eval()
    if context_shots:  # positions this long were trained; the configs say so (RoPE needs no table)
        model.config.max_position_embeddings = tokenizer.model_max_length = CONTEXT_MAX_POSITIONS
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
        long_batch_every=LONG_BATCH_EVERY,
        long_batch_rows=max(1, batch_size // LONG_BATCH_DIVISOR),
        max_window=MAX_WINDOW,
        context_shots=context_shots,
        context_answer_fraction=context_answer_fraction,
        zero_pad=zero_pad,
        init_from="zoo:arith-ar" if init_from == zoo_path("arith-ar") else str(init_from),
    )
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: train arith-mdlm into --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-from", type=Path, default=None, help="default: zoo:arith-ar")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--context-shots",
        type=int,
        default=0,
        help="put U{0..N} solved problems before each problem (arith-mdlm-fewshot: 36)",
    )
    parser.add_argument(
        "--context-answer-fraction",
        type=float,
        default=0.5,
        help="with --context-shots: share of rows whose context answers are masked too",
    )
    parser.add_argument(
        "--save-every", type=int, default=0, help="also save checkpoint-N/ every N steps"
    )
    parser.add_argument(
        "--zero-pad", action="store_true", help="write problems zero-padded: 417+085=0502"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train(
        args.out,
        args.steps,
        args.batch_size,
        args.seed,
        lr=args.lr,
        init_from=args.init_from,
        context_shots=args.context_shots,
        context_answer_fraction=args.context_answer_fraction,
        save_every=args.save_every,
        zero_pad=args.zero_pad,
    )


if __name__ == "__main__":
    main()
