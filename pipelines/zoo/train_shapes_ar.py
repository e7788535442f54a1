"""Train `shapes-vq` and `shapes-ar`: an image tokenizer and a causal LM over caption + image codes.

Two stages, both seeded, on the `shapes` data:

1. a diffusers ``VQModel`` (32x32 RGB <-> 8x8 codes from a codebook of `K` vectors): pixel MSE
   plus the quantizer's commitment/codebook loss, codes that go unused re-seeded from
   encoder outputs during the first half of training;
2. a transformers ``LlamaForCausalLM`` over ``[<pad>..., <bos>, caption words, <boi>, c_0 ..
   c_63]`` (the caption left-padded to a fixed length; the codes of every render encoded
   once by the trained VQ and kept in memory), next-token cross-entropy on the image-code
   positions only (``<boi>`` -> ``c_0`` included), captions replaced by the null prompt
   20% of the time so that classifier-free guidance works.

The output is the folder the ``ar-image`` pipeline reads (see ``ar_image.json``)::

    shapes-ar/ar_image.json  lm/  vq/  tokenizer/  training.json

``zoo:shapes-vq`` is ``shapes-ar/vq`` (one copy of the weights).

    python -m decodekit.pipelines.zoo.train_shapes_ar --out pipelines/zoo/models/shapes-ar
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from decodekit.pipelines.zoo.shapes_data import IMAGE_SIZE, caption_words, sample_shapes
from decodekit.pipelines.zoo.training import write_training_record
from diffusers import VQModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK, BOI = "<pad>", "<bos>", "<eos>", "<unk>", "<boi>"
IMAGE_TOKENS = (8, 8)  # codes per column and row: 32x32 pixels / downsampling 4
MAX_PROMPT_TOKENS = 10  # <bos> + the longest caption (8 words) + 1 spare
NULL_PROMPT = ""  # the unconditional prompt for classifier-free guidance: <pad>... <bos>
CAPTION_DROPOUT = 0.2
AR_MONITOR_SEED = 30_000  # held-out prompts for monitoring during training (not the gate's)


# --- tokenizer -----------------------------------------------------------------------------


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level caption tokenizer: <pad>=0, <bos>=1, <eos>=2, <unk>=3, the caption words, <boi>.

    Every caption word is one token; ``tokenizer(text)`` is ``<bos> words``, and with
    ``padding="max_length", max_length=MAX_PROMPT_TOKENS`` it pads on the left, so the
    caption always ends right before ``<boi>``.
    """
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *caption_words(), BOI])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[BOI],
        padding_side="left",
        model_max_length=MAX_PROMPT_TOKENS,
    )


def tokenize_prompts(tokenizer: PreTrainedTokenizerFast, prompts: list[str]) -> torch.Tensor:
    """Prompt ids (B, MAX_PROMPT_TOKENS): ``<pad>... <bos> words``, left-padded."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=MAX_PROMPT_TOKENS,
        truncation=True,
        return_tensors="pt",
    ).input_ids


# --- stage 1: the VQ tokenizer ---------------------------------------------------------------


def build_vq(codebook_size: int) -> VQModel:
    """A three-level VQModel (channels 16/32/32, no attention): 32x32x3 images to 8x8 codes of width 8."""
    return VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=16,
        vq_embed_dim=8,
        num_vq_embeddings=codebook_size,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
        lookup_from_codebook=True,  # vq.decode(indices, force_not_quantize=True, shape=...)
    )


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 renders (B, 3, 32, 32) to floats in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def train_vq(
    vq: VQModel,
    images: torch.Tensor,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    lr: float = 2e-3,
) -> list[float]:
    """Fit the VQ: MSE reconstruction + quantizer loss; re-seed unused codes every 100 steps.

    Returns the loss every 100 steps.
    """
    optimizer = torch.optim.AdamW(vq.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, lr, total_steps=max(steps, 100), pct_start=0.05
    )
    codebook = vq.quantize.embedding.weight
    usage = torch.zeros(len(codebook))
    losses = []
    vq.train()
    bar = tqdm(range(steps), desc="vq")
    for step in bar:
        x = to_unit(images[torch.randint(0, len(images), (batch_size,), generator=generator)])
        h = vq.encode(x).latents
        z_q, q_loss, (_, _, indices) = vq.quantize(h)
        recon = vq.decoder(vq.post_quant_conv(z_q))  # vq.decode would take z_q for indices
        loss = F.mse_loss(recon, x) + q_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        usage += torch.bincount(indices.flatten(), minlength=len(codebook))
        if (step + 1) % 100 == 0:
            if step < steps // 2:  # dead codes take the place of random encoder outputs
                dead = (usage == 0).nonzero().flatten()
                if len(dead):
                    flat = h.detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1])
                    pick = torch.randint(0, len(flat), (len(dead),), generator=generator)
                    with torch.no_grad():
                        codebook[dead] = flat[pick]
            usage.zero_()
            losses.append(round(loss.item(), 5))
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vq.eval()
    return losses


@torch.no_grad()
def encode_codes(vq: VQModel, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The VQ codes of uint8 renders, raster order: (N, 64) int64 in [0, K)."""
    chunks = []
    for i in range(0, len(images), batch_size):
        h = vq.encode(to_unit(images[i : i + batch_size])).latents
        _, _, (_, _, indices) = vq.quantize(h)
        chunks.append(indices.view(len(h), -1))
    return torch.cat(chunks)


@torch.no_grad()
def decode_codes(vq: VQModel, codes: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1], (N, 3, 32, 32), from codes (N, 64)."""
    h, w = IMAGE_TOKENS
    shape = (len(codes), h, w, vq.config.vq_embed_dim)
    out = vq.decode(codes.flatten(), force_not_quantize=True, shape=shape).sample
    return ((out + 1) / 2).clamp(0, 1)


# --- stage 2: the causal LM ------------------------------------------------------------------


def build_lm(vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> LlamaForCausalLM:
    """A 4-layer Llama of width 128 (4 heads, MLP 384), tied embeddings, 128 positions."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    return LlamaForCausalLM(config)


def train_lm(
    lm: LlamaForCausalLM,
    prompt_ids: torch.Tensor,
    codes: torch.Tensor,
    null_ids: torch.Tensor,
    layout: dict[str, Any],
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    lr: float = 2e-3,
    monitor: Any = None,
    caption_dropout: float = CAPTION_DROPOUT,
) -> list[float]:
    """Next-token cross-entropy on the image-code positions; returns the loss every 100 steps.

    Rows are ``prompt ids, <boi>, codes + code_offset``; the prompt's left padding is masked
    out and positions count from ``<bos>``, as `ARImagePipeline` feeds prompts.
    """
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, lr, total_steps=max(steps, 100), pct_start=0.05
    )
    boi = torch.full((batch_size, 1), layout["boi_token_id"])
    image_mask = torch.ones(batch_size, 1 + codes.shape[1], dtype=torch.long)
    prompt_len = prompt_ids.shape[1]
    losses = []
    lm.train()
    bar = tqdm(range(steps), desc="lm")
    for step in bar:
        idx = torch.randint(0, len(codes), (batch_size,), generator=generator)
        prompts = prompt_ids[idx].clone()
        prompts[torch.rand(batch_size, generator=generator) < caption_dropout] = null_ids
        seq = torch.cat([prompts, boi, codes[idx] + layout["code_offset"]], dim=1)
        # as the ar-image pipeline reads a prompt: pads masked out, positions from <bos> = 0
        mask = torch.cat([(prompts != layout["pad_token_id"]).long(), image_mask], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = lm(seq[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1]).logits
        logits = logits[:, prompt_len:]  # the positions <boi>, c_0 .. c_62
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), seq[:, prompt_len + 1 :].flatten()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0:
            losses.append(round(loss.item(), 4))
            if monitor is not None and (step + 1) % 1000 == 0:
                lm.eval()
                tqdm.write(f"step {step + 1}: {monitor(lm)}")
                lm.train()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    lm.eval()
    return losses


def _monitor(
    vq: VQModel, tokenizer: PreTrainedTokenizerFast, layout: dict[str, Any], num_prompts: int = 100
) -> Any:
    """A callable lm -> judge adherence of ARImagePipeline samples (guidance 1.5 and 3, top-k 32) on held-out prompts."""
    from decodekit.pipelines.ar_image import ARImagePipeline
    from decodekit.pipelines.zoo.shapes_judge import ShapesJudge

    judge = ShapesJudge.load()
    _, scenes = sample_shapes(num_prompts, seed=AR_MONITOR_SEED, two_shape_fraction=0.0)
    prompts = [s.caption for s in scenes]

    def measure(lm: LlamaForCausalLM) -> dict[str, dict[str, float]]:
        pipe = ARImagePipeline(lm, vq, tokenizer, layout)
        report = {}
        for scale in (1.5, 3.0):
            generators = [torch.Generator().manual_seed(i) for i in range(num_prompts)]
            out = pipe(prompts, guidance_scale=scale, top_k=32, generator=generators)
            scores = judge.adherence(out.images, prompts)
            report[scale] = {k: round(v, 3) for k, v in scores.items() if k != "counted"}
        return report

    return measure


# --- the whole run ---------------------------------------------------------------------------


def layout_for(tokenizer: PreTrainedTokenizerFast, codebook_size: int) -> dict[str, Any]:
    """The contents of ``ar_image.json``: where the codes sit in the LM's vocabulary."""
    boi = tokenizer.convert_tokens_to_ids(BOI)
    return {
        "image_tokens": list(IMAGE_TOKENS),
        "code_offset": boi + 1,
        "codebook_size": codebook_size,
        "boi_token_id": boi,
        "eoi_token_id": None,
        "pad_token_id": tokenizer.pad_token_id,
        "null_prompt": NULL_PROMPT,
        "max_prompt_tokens": MAX_PROMPT_TOKENS,
    }


def train(
    out: Path,
    steps: int,
    vq_steps: int,
    num_images: int,
    batch_size: int,
    seed: int,
    vq_batch_size: int = 32,
    codebook_size: int = 128,
    monitor: bool = False,
    measure: bool = True,
    caption_dropout: float = CAPTION_DROPOUT,
) -> Path:
    """Train both stages and save the folder; returns `out`.

    With `measure`, the gates of both models (``evaluate_shapes_vq``,
    ``evaluate_shapes_ar``) go into ``training.json``; with `monitor`, the LM's CFG
    samples are judged every 1000 steps.
    """
    torch.manual_seed(seed)
    random.seed(seed)
    generator = torch.Generator().manual_seed(seed)
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    images, scenes = sample_shapes(num_images, seed=seed)  # (N, 3, 32, 32) uint8

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out / "tokenizer")
    layout = layout_for(tokenizer, codebook_size)

    vq = build_vq(codebook_size)
    vq_losses = train_vq(vq, images, vq_steps, vq_batch_size, generator)
    vq.save_pretrained(out / "vq", safe_serialization=True)
    vq_seconds = round(time.time() - started, 1)
    codes = encode_codes(vq, images)

    prompt_ids = tokenize_prompts(tokenizer, [s.caption for s in scenes])
    null_ids = tokenize_prompts(tokenizer, [NULL_PROMPT])[0]
    lm = build_lm(
        layout["code_offset"] + codebook_size,
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    lm_losses = train_lm(
        lm,
        prompt_ids,
        codes,
        null_ids,
        layout,
        steps,
        batch_size,
        generator,
        monitor=_monitor(vq, tokenizer, layout) if monitor else None,
        caption_dropout=caption_dropout,
    )
    lm.save_pretrained(out / "lm", safe_serialization=True)
    (out / "ar_image.json").write_text(json.dumps(layout, indent=1) + "\n")
    gates, gate_seconds = {}, time.time()
    if measure:
        from decodekit.pipelines.zoo.evaluate import evaluate_shapes_ar, evaluate_shapes_vq

        gates = {"shapes-vq": evaluate_shapes_vq(folder=out / "vq")}
        gates["shapes-ar"] = evaluate_shapes_ar(folder=out)
        tqdm.write(f"gates: {gates}")
    write_training_record(
        out,
        started,
        seed=seed,
        steps=steps,
        vq_steps=vq_steps,
        num_images=num_images,
        batch_size=batch_size,
        vq_batch_size=vq_batch_size,
        codebook_size=codebook_size,
        caption_dropout=caption_dropout,
        vq_seconds=vq_seconds,
        vq_losses=vq_losses,
        lm_losses=lm_losses,
        gates=gates,
        gate_seconds=round(time.time() - gate_seconds, 1),  # included in train_seconds
    )
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: train shapes-vq and shapes-ar into --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=2000, help="LM training steps")
    parser.add_argument("--vq-steps", type=int, default=800)
    parser.add_argument("--num-images", type=int, default=30000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--codebook-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--caption-dropout", type=float, default=CAPTION_DROPOUT)
    parser.add_argument("--monitor", action="store_true", help="judge CFG samples every 1000 steps")
    parser.add_argument("--no-measure", action="store_true", help="skip the gates at the end")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train(
        args.out,
        args.steps,
        args.vq_steps,
        args.num_images,
        args.batch_size,
        args.seed,
        codebook_size=args.codebook_size,
        monitor=args.monitor,
        measure=not args.no_measure,
        caption_dropout=args.caption_dropout,
    )


if __name__ == "__main__":
    main()
