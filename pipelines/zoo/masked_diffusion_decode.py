"""LLaDA-style decoding with low-confidence remasking, small and self-contained.

Large Language Diffusion Models (Nie et al., 2025), arXiv:2502.09992, Algorithm for
low-confidence remasking: start from a fully masked answer window, and at every step
predict all masked positions at once, keep the most confident predictions and leave the
rest masked. The zoo uses it to measure arith-mdlm; the full masked-diffusion pipeline of
decodekit lives elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def tokens_per_step(answer_length: int, steps: int) -> list[int]:
    """How many masked positions each step unmasks: as even as possible, summing to the length."""
    base, extra = divmod(answer_length, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


@torch.no_grad()
def low_confidence_decode(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answer_length: int,
    steps: int | None = None,
) -> list[str]:
    """Fill an `answer_length` window after each prompt in `steps` steps (default: one per token).

    Returns each answer as text, cut at the first end-of-sequence token.
    """
    steps = steps or answer_length
    mask_id, pad_id, eos_id = (
        tokenizer.mask_token_id,
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
    )
    rows = [ids + [mask_id] * answer_length for ids in tokenizer(list(prompts)).input_ids]
    width = max(len(r) for r in rows)
    x = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])  # (B, T)
    attention_mask = (x != pad_id).long()  # (B, T)
    device = next(model.parameters()).device
    x, attention_mask = x.to(device), attention_mask.to(device)
    for count in tokens_per_step(answer_length, steps):
        if count == 0:
            continue
        logits = model(input_ids=x, attention_mask=attention_mask).logits  # (B, T, V)
        logits[..., mask_id] = float("-inf")  # never predict the mask itself
        confidence, prediction = logits.softmax(-1).max(-1)  # (B, T), (B, T)
        masked = x == mask_id
        confidence = confidence.masked_fill(~masked, float("-inf"))
        chosen = confidence.topk(count, dim=-1).indices  # (B, count)
        x.scatter_(1, chosen, prediction.gather(1, chosen))
    answers = []
    for row, prompt_ids in zip(x.tolist(), rows):
        start = len(prompt_ids) - answer_length
        window = row[start : start + answer_length]
        if eos_id in window:
            window = window[: window.index(eos_id)]
        answers.append(tokenizer.decode(window, skip_special_tokens=True))
    return answers
