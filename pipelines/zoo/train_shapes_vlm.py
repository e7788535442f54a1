"""Train `shapes-vlm`: a tiny LLaVA that answers questions about `shapes` renders.

A ``LlavaForConditionalGeneration`` (a CLIP vision tower over 2x2-pixel patches of the
32x32 render, so 256 image tokens; LLaVA's two-layer MLP projector; a deep, narrow
Llama) learns `shapes_vqa`'s questions: "what shape is it", "what colour is it",
"where is it", each answered by one word, and "describe it", answered by a six-word
caption ("a red circle at the top"). Two stages, one command:

1. as LLaVA starts from a CLIP tower that already sees, the vision tower is first
   pretrained as a classifier of the renders (`shapes_vision_pretrain`,
   ``--vision-pretrain-steps``; 0 skips it, ``--vision-init FILE`` loads a tower
   pretrained earlier);
2. the whole model trains on the questions. A training row is ``<s>``, the image
   tokens, the question, the answer and ``</s>``; the loss is the cross-entropy of the
   answer and of ``</s>`` (the rest of the row is given). Every weight trains (vision
   tower, projector and language model together) with AdamW, a linear warm-up and a
   cosine decay; the checkpoint kept is the best on the ``selection`` split, checked
   as training goes. The folder holds the model and its processor (``save_pretrained`` of
both: a word-level tokenizer over `shapes_vqa.vqa_words` and CLIP image processing at
32x32), which ``pipeline: {type: vlm, model: zoo:shapes-vlm}`` loads::

    python -m decodekit.pipelines.zoo.train_shapes_vlm train --out pipelines/zoo/models/shapes-vlm

``evaluate`` measures a folder's greedy answers on a split (the gate: 240 questions
of the ``gate`` split)::

    python -m decodekit.pipelines.zoo.train_shapes_vlm evaluate shapes-vlm --split gate
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from decodekit.pipelines.zoo import zoo_path
from decodekit.pipelines.zoo.shapes_vqa import (
    KINDS,
    QUESTIONS,
    VQAItem,
    accuracy,
    answer_of,
    vqa_items,
)
from decodekit.pipelines.zoo.shapes_vqa import vqa_words as question_words
from decodekit.pipelines.zoo.training import (
    adamw_warmup_cosine,
    earlier_runs,
    write_training_record,
)
from decodekit.testing import tiny_llava_processor
from tqdm import tqdm

IMAGE_SIZE = 32
PATCH_SIZE = 2
"""Pixels per patch side: a 32x32 render is 16x16 = 256 image tokens."""
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID = 0, 1, 2, 4
MAX_NEW_TOKENS = 7
"""The gate's greedy decoding: at most a caption's six words and ``</s>``."""
DIMS: dict[str, int] = {
    "patch_size": PATCH_SIZE,
    "vision_width": 64,
    "vision_layers": 2,
    "text_width": 64,
    "text_layers": 16,
    "text_intermediate": 128,
}
"""The default shape (the trainer's ``--vision-width`` ... options)."""


def vocabulary() -> list[str]:
    """The tokenizer's words in id order: the special tokens, then the questions' and answers'."""
    return [*SPECIAL_TOKENS, *question_words()]


def shapes_vlm_processor(patch_size: int = PATCH_SIZE):
    """The model's `LlavaProcessor`: CLIP image processing at 32x32, ``<s>`` before each text."""
    return tiny_llava_processor(IMAGE_SIZE, patch_size, vocabulary(), bos=True)


def shapes_vlm_config(
    patch_size: int = PATCH_SIZE,
    vision_width: int = 64,
    vision_layers: int = 2,
    text_width: int = 64,
    text_layers: int = 16,
    text_intermediate: int = 128,
):
    """The `LlavaConfig`: CLIP tower (patch 2, 4 heads), Llama (4 heads, 2 K/V heads), 256 image tokens."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=patch_size,
        projection_dim=vision_width,
    )
    text = LlamaConfig(
        vocab_size=len(vocabulary()),
        hidden_size=text_width,
        intermediate_size=text_intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_ID,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=(IMAGE_SIZE // patch_size) ** 2,
    )


def new_model(seed: int = 0, **dims: int):
    """A freshly initialised model of `shapes_vlm_config` (sdpa attention, training mode)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(
        shapes_vlm_config(**dims), attn_implementation="sdpa"
    )
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    return model


# --------------------------------------------------------------------------- batches
def prompt_text(question: str) -> str:
    """The text the processor gets for a question: the image token, then the question."""
    return f"<image> {question}"


def question_ids(processor) -> dict[str, list[int]]:
    """Each kind's prompt ids as the processor writes them (``<s>``, 256 image ids, question)."""
    from PIL import Image

    blank = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    return {
        kind: processor(images=blank, text=prompt_text(q)).input_ids[0]
        for kind, q in QUESTIONS.items()
    }


def pixel_values(processor, items: list[VQAItem]) -> torch.Tensor:
    """The image processor's pixel values of the items' renders: (N, 3, 32, 32)."""
    rows = []
    for i in range(0, len(items), 1000):
        chunk = [it.image for it in items[i : i + 1000]]
        rows.append(processor.image_processor(chunk, return_tensors="pt")["pixel_values"])
    return torch.cat(rows)


@functools.cache
def answer_lengths() -> dict[str, int]:
    """Each kind's answer length in words (tokens): 1, or 6 for a "describe it" caption."""
    from decodekit.pipelines.zoo.shapes_data import ShapeObject, ShapeScene

    scene = ShapeScene((ShapeObject("circle", "red", "top", "small"),))
    return {kind: len(answer_of(scene, kind).split()) for kind in KINDS}


def answer_ids(items: list[VQAItem], vocab: dict[str, int]) -> torch.Tensor:
    """Each image's answers to every kind's question, (N, len(KINDS), A) ids, ``<pad>`` after
    a shorter answer (A: the longest answer)."""
    width = max(answer_lengths().values())
    out = torch.full((len(items), len(KINDS), width), PAD_ID)
    for i, it in enumerate(items):
        for k, kind in enumerate(KINDS):
            words = answer_of(it.scene, kind).split()
            out[i, k, : len(words)] = torch.tensor([vocab[w] for w in words])
    return out


def suffix_rows(templates: dict[str, list[int]], answers: torch.Tensor):
    """Each image's question-and-answer rows after the shared ``<s>`` and image prefix.

    `answers` holds each image's answer ids in `KINDS` order, (B, K, A) (`answer_ids`).
    Returns the rows' ids right-padded, (KB, S), and each row's question and answer
    lengths, (KB,) each; the rows of image b are rows bK to bK + K - 1.
    """
    prefix = len(next(iter(templates.values()))) - len(QUESTIONS["shape"].split())
    questions = [templates[kind][prefix:] for kind in KINDS]  # the question words only
    given = [answer_lengths()[kind] for kind in KINDS]
    width = max(len(q) + a for q, a in zip(questions, given))
    rows = torch.full((answers.shape[0], len(KINDS), width), PAD_ID)
    for k, (q, a) in enumerate(zip(questions, given)):
        rows[:, k, : len(q)] = torch.tensor(q)
        rows[:, k, len(q) : len(q) + a] = answers[:, k, :a]
    q_lengths = torch.tensor([len(q) for q in questions]).repeat(answers.shape[0])
    a_lengths = torch.tensor(given).repeat(answers.shape[0])
    return rows.flatten(0, 1), q_lengths, a_lengths


def answer_targets(answers: torch.Tensor) -> torch.Tensor:
    """What `answer_logits` predicts: each row's answer ids and ``</s>``, -100 after, (KB, A + 1)."""
    given = torch.tensor([answer_lengths()[kind] for kind in KINDS])  # (K,)
    B, K, A = answers.shape
    targets = torch.cat([answers, torch.full((B, K, 1), -100)], 2)
    j = torch.arange(A + 1)
    targets[:, j[None, :] == given[:, None]] = EOS_ID  # (K, A + 1) picks </s> of every image
    targets[:, j[None, :] > given[:, None]] = -100
    return targets.flatten(0, 1)


def answer_logits(model, templates: dict[str, list[int]], answers: torch.Tensor, pixels):
    """Logits that predict each row's answer tokens and the ``</s>`` after them: (KB, A + 1, vocab)
    (rows of a shorter answer repeat their last logits after its ``</s>``).

    The ``<s>`` and image prefix of each image runs once and its K/V cache serves the
    image's questions (the same logits as full rows, a K-th of the compute).
    """
    B = pixels.shape[0]
    prefix = torch.tensor(templates["shape"][: -len(QUESTIONS["shape"].split())])
    out = model(input_ids=prefix.expand(B, -1), pixel_values=pixels, use_cache=True)  # (B, P)
    cache = out.cache
    cache.batch_repeat_interleave(len(KINDS))  # (KB, P) keys and values
    rows, q_lengths, a_lengths = suffix_rows(templates, answers)  # (KB, S)
    P, S = len(prefix), rows.shape[1]
    valid = torch.arange(S)[None] < (q_lengths + a_lengths)[:, None]  # not the padding
    mask = torch.cat([torch.ones(len(rows), P, dtype=torch.long), valid.long()], 1)
    logits = model(
        input_ids=rows,
        attention_mask=mask,
        position_ids=(P + torch.arange(S)).expand(len(rows), -1),
        cache=cache,
    ).logits  # (KB, S, vocab)
    at = (q_lengths - 1)[:, None] + torch.arange(answers.shape[2] + 1)[None]
    at = torch.minimum(at, (q_lengths + a_lengths - 1)[:, None])  # the question word, the answer
    return logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1]))


def answer_loss(model, templates: dict[str, list[int]], answers: torch.Tensor, pixels):
    """Mean cross-entropy of every answer token and ``</s>`` of every image's questions."""
    logits = answer_logits(model, templates, answers, pixels)  # (KB, A + 1, vocab)
    targets = answer_targets(answers)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


# --------------------------------------------------------------------------- answering
@torch.no_grad()
def generate_answers(
    model, processor, items: list[VQAItem], batch_size: int = 80, **generate_kwargs: Any
) -> list[str]:
    """Greedy answers through ``generate`` (left padding), decoded without special tokens."""
    processor.tokenizer.padding_side = "left"
    texts = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        enc = processor(
            images=[it.image for it in chunk],
            text=[prompt_text(it.question) for it in chunk],
            return_tensors="pt",
            padding=True,
        )
        enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
        kwargs = {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False, **generate_kwargs}
        out = model.generate(**enc, pad_token_id=PAD_ID, eos_token_id=EOS_ID, **kwargs)
        new = out[:, enc["input_ids"].shape[1] :]
        texts += processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    return texts


def evaluate_vlm(
    folder: str | Path = "shapes-vlm",
    split: str = "gate",
    count: int = 240,
    seed: int = 0,
    model: Any = None,
    processor: Any = None,
) -> dict[str, Any]:
    """Accuracy of greedy answers to `count` questions of `split` (a third of each kind)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if model is None:
        path = Path(folder) if Path(folder).is_dir() else zoo_path(str(folder))
        model = LlavaForConditionalGeneration.from_pretrained(path).eval()
        processor = AutoProcessor.from_pretrained(path)
    items = vqa_items(count, seed=seed, split=split)
    report = accuracy(generate_answers(model, processor, items), items)
    return {"split": split, "seed": seed, "decoding": "greedy", **report}


@torch.no_grad()
def teacher_forced_accuracy(model, templates, answers, pixels, batch_size: int = 40) -> dict:
    """Share of questions whose every answer token is the greedy choice given the ones before,
    overall and per kind (``</s>`` not read).

    A fast check during training (one forward per image for all its questions).
    """
    was_training = model.training
    model.eval()
    right = torch.zeros(len(KINDS))
    for i in range(0, len(answers), batch_size):
        chunk = answers[i : i + batch_size]  # (b, K, A)
        logits = answer_logits(model, templates, chunk, pixels[i : i + batch_size])
        targets = answer_targets(chunk)
        read = (targets != -100) & (targets != EOS_ID)
        hits = ((logits.argmax(-1) == targets) | ~read).all(1).view(chunk.shape[:2])
        right += hits.sum(0)
    model.train(was_training)
    return share_report(right, len(answers), KINDS)


def share_report(right: torch.Tensor, count: int, names) -> dict[str, float]:
    """``right[k] / count`` per name and their mean ("overall"), rounded to 4 places."""
    shares = (right / count).tolist()
    return {"overall": round(sum(shares) / len(shares), 4)} | {
        name: round(v, 4) for name, v in zip(names, shares)
    }


# --------------------------------------------------------------------------- training
def train_vlm(
    out: Path,
    *,
    steps: int = 800,
    batch_size: int = 16,
    lr: float = 2e-3,
    warmup: int = 60,
    weight_decay: float = 0.05,
    num_images: int = 15000,
    seed: int = 0,
    check_every: int = 100,
    max_minutes: float | None = None,
    init_from: Path | None = None,
    vision_init: Path | None = None,
    vision_pretrain_steps: int = 1500,
    vision_pretrain_images: int = 20000,
    measure: bool = True,
    command: str | None = None,
    **dims: int,
) -> Path:
    """Train on `num_images` training renders (a question of each kind each); save model and processor to `out`.

    With `init_from` (a shapes-vlm folder), training continues from that folder's model
    and processor (`dims` are then ignored). Otherwise the vision tower starts from
    `vision_init` (a `shapes_vision_pretrain` file) or, without one, is pretrained here
    for `vision_pretrain_steps` on `vision_pretrain_images` renders (0 steps: from scratch).
    """
    started = time.time()
    pretraining = None
    if init_from is not None:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration.from_pretrained(
            init_from, attn_implementation="sdpa"
        ).train()
        processor = AutoProcessor.from_pretrained(init_from)
        dims = {"patch_size": model.config.vision_config.patch_size}
    else:
        dims = {**DIMS, **dims}
        processor = shapes_vlm_processor(dims["patch_size"])
        model = new_model(seed, **dims).train()
        from decodekit.pipelines.zoo.shapes_vision_pretrain import (
            load_vision_init,
            pretrain_vision,
        )

        if vision_init is not None:  # a tower pretrained by shapes_vision_pretrain
            load_vision_init(model, vision_init)
        elif vision_pretrain_steps > 0:
            vision = {k: dims[k] for k in ("patch_size", "vision_width", "vision_layers")}
            with tempfile.TemporaryDirectory() as tmp:
                tower = Path(tmp) / "vision_tower.safetensors"
                pretraining = pretrain_vision(
                    tower,
                    steps=vision_pretrain_steps,
                    num_images=vision_pretrain_images,
                    seed=seed,
                    command="",
                    **vision,
                )
                load_vision_init(model, tower)
            pretraining.pop("command")
    vocab = {w: i for i, w in enumerate(vocabulary())}
    templates = question_ids(processor)

    def encoded(items: list[VQAItem]):  # each image's answers in KINDS order, and its pixels
        return answer_ids(items, vocab), pixel_values(processor, items)

    train_answers, train_pixels = encoded(vqa_items(num_images, seed, "train"))
    sel_answers, sel_pixels = encoded(vqa_items(80, 0, "selection"))
    data_seconds = round(time.time() - started, 1)

    optimizer, schedule = adamw_warmup_cosine(
        model.parameters(), lr=lr, weight_decay=weight_decay, warmup=warmup, steps=steps
    )
    generator = torch.Generator().manual_seed(seed + 1)
    losses, window, checks = [], [], []
    best, best_state, kept_step = -1.0, None, 0
    done = 0
    bar = tqdm(range(steps), desc="shapes-vlm", mininterval=30)
    for step in bar:
        if max_minutes is not None and time.time() - started > 60 * max_minutes:
            break
        rows = torch.randint(0, len(train_answers), (batch_size,), generator=generator)
        loss = answer_loss(model, templates, train_answers[rows], train_pixels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        window.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % 50 == 0:
            losses.append(round(sum(window) / len(window), 4))
            window = []
        if done % check_every == 0 or done == steps:
            check = teacher_forced_accuracy(model, templates, sel_answers, sel_pixels)
            score = check["overall"]
            checks.append({"step": done, "minutes": round((time.time() - started) / 60, 2)} | check)
            tqdm.write(f"step {done}: loss {losses[-1] if losses else '-'}, selection {check}")
            if score >= best:  # a tie keeps the later weights
                best, best_state, kept_step = score, copy.deepcopy(model.state_dict()), done
    if window:
        losses.append(round(sum(window) / len(window), 4))
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        kept_step = done
    model.eval()
    train_minutes = round((time.time() - started) / 60, 2)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    gates = {}
    if measure:
        gates = {
            "selection": evaluate_vlm(out, "selection", model=model, processor=processor),
            "gate": evaluate_vlm(out, "gate", model=model, processor=processor),
        }
        tqdm.write(f"gates: {json.dumps(gates)}")
    write_training_record(
        out,
        started,
        earlier_runs=earlier_runs(init_from),
        command=command or f"python -m decodekit.pipelines.zoo.train_shapes_vlm train --out {out}",
        seed=seed,
        dims=dims,
        init_from=str(init_from) if init_from is not None else None,
        vision_init=str(vision_init) if vision_init is not None else None,
        vision_pretraining=pretraining,
        parameters=sum(p.numel() for p in model.parameters()),
        vision_parameters=sum(p.numel() for p in model.model.vision_tower.parameters()),
        image_tokens=model.config.image_seq_length,
        steps=done,
        steps_asked=steps,
        max_minutes=max_minutes,
        batch_size=batch_size,
        num_images=num_images,
        lr=lr,
        schedule=f"AdamW (0.9, 0.98), weight decay {weight_decay}, {warmup} steps linear "
        "warm-up then cosine to 0, clip 1.0",
        loss="cross-entropy of the answer's words and </s>",
        data_seconds=data_seconds,
        train_minutes=train_minutes,
        losses_every_50_steps=losses,
        selection_checks=checks,
        kept_step=kept_step,
        gates=gates,
    )
    return out


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> None:
    """Command line: ``train`` or ``evaluate``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    train = sub.add_parser("train", help="train the shapes VQA LLaVA")
    train.add_argument("--out", type=Path, required=True)
    train.add_argument("--steps", type=int, default=800)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--warmup", type=int, default=60)
    train.add_argument("--weight-decay", type=float, default=0.05)
    train.add_argument("--num-images", type=int, default=15000)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--check-every", type=int, default=100)
    train.add_argument("--max-minutes", type=float, default=None)
    train.add_argument("--init-from", type=Path, default=None, help="continue from a folder")
    train.add_argument("--no-measure", action="store_true", help="skip the gates at the end")
    train.add_argument(
        "--vision-init", type=Path, default=None, help="a shapes_vision_pretrain tower"
    )
    train.add_argument(
        "--vision-pretrain-steps",
        type=int,
        default=1500,
        help="steps of the vision tower's pretraining stage (0: none; ignored with --vision-init)",
    )
    for dim, value in DIMS.items():
        train.add_argument("--" + dim.replace("_", "-"), type=int, default=value)
    evaluate = sub.add_parser("evaluate", help="greedy answers of a folder or zoo name; JSON")
    evaluate.add_argument("model", help="zoo name (shapes-vlm) or folder")
    evaluate.add_argument("--split", choices=("selection", "gate"), default="gate")
    evaluate.add_argument("--count", type=int, default=240)
    evaluate.add_argument("--seed", type=int, default=0)
    for p in sub.choices.values():
        p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = " ".join(
        ["python -m decodekit.pipelines.zoo.train_shapes_vlm", *(argv or sys.argv[1:])]
    )
    if args.stage == "train":
        keys = ("steps", "batch_size", "lr", "warmup", "weight_decay", "num_images", "seed")
        settings = {k: getattr(args, k) for k in (*keys, "check_every", "max_minutes", "init_from")}
        train_vlm(
            args.out,
            measure=not args.no_measure,
            vision_init=args.vision_init,
            vision_pretrain_steps=args.vision_pretrain_steps,
            command=command,
            **settings,
            **{k: getattr(args, k) for k in DIMS},
        )
    else:
        print(json.dumps(evaluate_vlm(args.model, args.split, args.count, args.seed), indent=1))


if __name__ == "__main__":
    main()
