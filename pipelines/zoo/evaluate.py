"""Measure the zoo's quality gates: one `evaluate_<model>` function per model, and a command.

    python -m decodekit.pipelines.zoo.evaluate shapes-judge
    python -m decodekit.pipelines.zoo.evaluate shapes-sd
    python -m decodekit.pipelines.zoo.evaluate shapes-dit
    python -m decodekit.pipelines.zoo.evaluate arith-ar
    python -m decodekit.pipelines.zoo.evaluate arith-mdlm
    python -m decodekit.pipelines.zoo.evaluate arith-mdlm-windows   # long generation windows
    python -m decodekit.pipelines.zoo.evaluate arith-mdlm-fewshot   # after few-shot prompts
    python -m decodekit.pipelines.zoo.evaluate shapes-vq
    python -m decodekit.pipelines.zoo.evaluate shapes-ar

Every evaluation draws its held-out data from fixed seeds that training never uses, and
prints a JSON object of the measured figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from decodekit.pipelines.masked_diffusion import MaskedDiffusionLMPipeline
from decodekit.pipelines.zoo import zoo_path
from decodekit.pipelines.zoo.arith_data import (
    ANSWER_LENGTH,
    held_out_few_shot,
    held_out_problems,
)
from decodekit.pipelines.zoo.shapes_data import sample_shapes
from decodekit.pipelines.zoo.shapes_judge import ShapesJudge

JUDGE_EVAL_SEED = 10_000
SD_EVAL_SEED = 20_000


def evaluate_shapes_judge(num_images: int = 2000, folder: Path | None = None) -> dict[str, Any]:
    """Judge accuracy per attribute on held-out one-shape renders (seed 10000)."""
    judge = ShapesJudge.load(folder)
    images, scenes = sample_shapes(num_images, seed=JUDGE_EVAL_SEED, two_shape_fraction=0.0)
    scores = judge.adherence(images.float() / 255.0, [s.caption for s in scenes])
    return {"num_images": num_images} | {
        f"accuracy_{k}": v for k, v in scores.items() if k != "counted"
    }


def evaluate_shapes_sd(
    num_prompts: int = 200,
    steps: int = 50,
    guidance_scale: float = 3.0,
    folder: Path | None = None,
    judge_folder: Path | None = None,
    batch_size: int = 100,
) -> dict[str, Any]:
    """Prompt adherence of shapes-sd (judged by shapes-judge) and Fréchet distances.

    Prompts are the captions of `num_prompts` held-out one-shape scenes (seed 20000).
    ``frechet_generated_vs_real`` compares the generated images with renders of the same
    scenes; ``frechet_real_vs_real`` compares two independent render sets, as a floor.
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        folder or zoo_path("shapes-sd"), safety_checker=None
    )
    call = {"num_inference_steps": steps, "guidance_scale": guidance_scale}
    return judge_text_to_image(pipe, call, num_prompts, judge_folder, batch_size) | {
        "steps": steps,
        "guidance_scale": guidance_scale,
    }


def evaluate_shapes_dit(
    num_prompts: int = 200, steps: int = 20, true_cfg_scale: float = 3.0, **where: Any
) -> dict[str, Any]:
    """shapes-sd's gate on shapes-dit (FluxPipeline): the same prompts, judge and Fréchet distances.

    Classifier-free guidance is Flux's ``true_cfg_scale`` with an empty negative prompt;
    32x32 images, Euler flow-matching steps. ``where``: ``folder``, ``judge_folder`` and
    ``batch_size`` (100), as for shapes-sd.
    """
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(where.get("folder") or zoo_path("shapes-dit"))
    call = {"num_inference_steps": steps, "true_cfg_scale": true_cfg_scale, "height": 32}
    call |= {"width": 32, "max_sequence_length": pipe.tokenizer_2.model_max_length}
    judging = (where.get("judge_folder"), where.get("batch_size", 100))
    out = judge_text_to_image(pipe, call, num_prompts, *judging, negative="")
    return out | {"steps": steps, "true_cfg_scale": true_cfg_scale}


def judge_text_to_image(
    pipe: Any,
    call: dict[str, Any],
    num_prompts: int,
    judge_folder: Path | None,
    batch_size: int,
    negative: str | None = None,
) -> dict[str, Any]:
    """Generate the captions of `num_prompts` held-out one-shape scenes (seed 20000) and judge them.

    ``call``: the pipeline's keyword arguments besides the prompts, generator and output
    type; ``negative``: a negative prompt for every prompt. Returns the shapes-judge
    adherence per attribute, the Fréchet distances and the generation time.
    """
    pipe.set_progress_bar_config(disable=True)
    judge = ShapesJudge.load(judge_folder)
    real, scenes = sample_shapes(num_prompts, seed=SD_EVAL_SEED, two_shape_fraction=0.0)
    other_real, _ = sample_shapes(num_prompts, seed=SD_EVAL_SEED + 1, two_shape_fraction=0.0)
    prompts = [s.caption for s in scenes]
    generator = torch.Generator().manual_seed(0)
    started = time.time()
    chunks = []
    for i in range(0, num_prompts, batch_size):
        batch = prompts[i : i + batch_size]
        if negative is not None:
            call = call | {"negative_prompt": [negative] * len(batch)}
        out = pipe(batch, **call, generator=generator, output_type="pt")
        chunks.append(out.images)  # (b, 3, 32, 32) in [0, 1]
    generated = torch.cat(chunks)
    seconds = time.time() - started
    scores = judge.adherence(generated, prompts)
    real_f, other_f = real.float() / 255.0, other_real.float() / 255.0
    return {
        "num_prompts": num_prompts,
        **{f"adherence_{k}": v for k, v in scores.items() if k != "counted"},
        "frechet_generated_vs_real": judge.frechet(generated, real_f),
        "frechet_real_vs_real": judge.frechet(other_f, real_f),
        "generation_seconds": round(seconds, 1),
    }


def evaluate_arith_ar(num_problems: int = 500, folder: Path | None = None) -> dict[str, Any]:
    """Exact-answer accuracy of greedy decoding on held-out problems."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = folder or zoo_path("arith-ar")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    problems = held_out_problems(num_problems)
    batch = tokenizer([p for p, _ in problems], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=ANSWER_LENGTH,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    answers = tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    correct = sum(a.strip() == want for a, (_, want) in zip(answers, problems))
    return {
        "num_problems": num_problems,
        "exact_answers": correct / num_problems,
        "decoding": "greedy",
    }


def mdlm_pipeline(folder: Path) -> MaskedDiffusionLMPipeline:
    """The masked-diffusion-lm pipeline over a zoo diffusion LM folder (arith-mdlm, arith-mdlm-fewshot)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return MaskedDiffusionLMPipeline(AutoModelForCausalLM.from_pretrained(folder).eval(), tokenizer)


def mdlm_answers(pipe: MaskedDiffusionLMPipeline, prompts: list[str]) -> list[str]:
    """The gates' decoding: an `ANSWER_LENGTH` window, one block, low-confidence remasking, one token per step.

    Each answer is the window's text up to the first ``<eos>``.
    """
    out = pipe(
        prompt=prompts,
        gen_length=ANSWER_LENGTH,
        block_length=ANSWER_LENGTH,
        steps=ANSWER_LENGTH,
        remasking="low-confidence",
    )
    return out.texts


def evaluate_arith_mdlm(num_problems: int = 500, folder: Path | None = None) -> dict[str, Any]:
    """Exact-answer accuracy of low-confidence remasking, steps = answer window length."""
    pipe = mdlm_pipeline(folder or zoo_path("arith-mdlm"))
    problems = held_out_problems(num_problems)
    answers = mdlm_answers(pipe, [p for p, _ in problems])
    correct = sum(a == want for a, (_, want) in zip(answers, problems))
    return {
        "num_problems": num_problems,
        "exact_answers": correct / num_problems,
        "decoding": f"low-confidence remasking, {ANSWER_LENGTH} steps",
    }


def evaluate_arith_mdlm_windows(
    num_problems: int = 64,
    folder: Path | None = None,
    windows: tuple[int, ...] = (5, 32, 64, 128, 256),
    threshold_windows: tuple[int, ...] = (64, 256),
    batch_size: int = 16,
) -> dict[str, Any]:
    """Exact-answer accuracy of the masked-diffusion-lm pipeline at long generation windows.

    Blocks of 32 (or the whole window when shorter), one token per step; for
    `threshold_windows` also threshold parallel decoding (τ = 0.9) and its model calls.
    """
    pipe = mdlm_pipeline(folder or zoo_path("arith-mdlm"))
    problems = held_out_problems(num_problems)
    batches = [problems[i : i + batch_size] for i in range(0, num_problems, batch_size)]

    def accuracy(gen_length: int, threshold: float | None) -> tuple[float, float]:
        correct, calls = 0, 0
        for batch in batches:
            out = pipe(
                prompt=[p for p, _ in batch],
                gen_length=gen_length,
                block_length=min(32, gen_length),
                steps=gen_length,
                threshold=threshold,
            )
            correct += sum(t.strip() == a for t, (_, a) in zip(out.texts, batch))
            calls += out.nfe
        return correct / num_problems, calls / len(batches)

    rows = []
    for window in windows:
        acc, calls = accuracy(window, None)
        row = {"gen_length": window, "accuracy": acc, "model_calls": calls}
        if window in threshold_windows:
            row["threshold_0.9_accuracy"], row["threshold_0.9_model_calls"] = accuracy(window, 0.9)
        rows.append(row)
    return {"num_problems": num_problems, "batch_size": batch_size, "rows": rows}


VQ_EVAL_SEED = 40_000


def evaluate_shapes_vq(num_images: int = 500, folder: Path | None = None) -> dict[str, Any]:
    """The judge's adherence on VQ reconstructions of held-out one-shape renders, with their captions.

    Each render (seed 40000) is encoded to its 8x8 codes and decoded back; ``codes_used``
    counts the distinct codes among them.
    """
    from decodekit.pipelines.zoo.train_shapes_ar import decode_codes, encode_codes
    from diffusers import VQModel

    vq = VQModel.from_pretrained(folder or zoo_path("shapes-vq")).eval()
    images, scenes = sample_shapes(num_images, seed=VQ_EVAL_SEED, two_shape_fraction=0.0)
    codes = encode_codes(vq, images)
    recon = decode_codes(vq, codes)
    scores = ShapesJudge.load().adherence(recon, [s.caption for s in scenes])
    return {
        "num_images": num_images,
        **{f"adherence_{k}": v for k, v in scores.items() if k != "counted"},
        "pixel_mse": round(float(torch.nn.functional.mse_loss(recon, images.float() / 255)), 5),
        "codes_used": int(codes.unique().numel()),
    }


def evaluate_shapes_ar(
    num_prompts: int = 200,
    guidance_scale: float = 1.5,
    temperature: float = 1.0,
    top_k: int | None = 32,
    folder: Path | None = None,
    batch_size: int = 100,
) -> dict[str, Any]:
    """Prompt adherence of shapes-ar samples through `ARImagePipeline` (judged by shapes-judge).

    Prompts are the captions of `num_prompts` held-out one-shape scenes (seed 20000, as
    for shapes-sd); prompt i samples with its own generator seeded i. Also the Fréchet
    distance to renders of the same scenes.
    """
    from decodekit.pipelines.ar_image import ARImagePipeline

    pipe = ARImagePipeline.from_pretrained(folder or zoo_path("shapes-ar"))
    judge = ShapesJudge.load()
    real, scenes = sample_shapes(num_prompts, seed=SD_EVAL_SEED, two_shape_fraction=0.0)
    prompts = [s.caption for s in scenes]
    started = time.time()
    images = []
    for i in range(0, num_prompts, batch_size):
        out = pipe(
            prompts[i : i + batch_size],
            guidance_scale=guidance_scale,
            temperature=temperature,
            top_k=top_k,
            generator=[
                torch.Generator().manual_seed(j) for j in range(i, min(i + batch_size, num_prompts))
            ],
        )
        images += out.images
    seconds = time.time() - started
    scores = judge.adherence(images, prompts)
    return {
        "num_prompts": num_prompts,
        "guidance_scale": guidance_scale,
        "temperature": temperature,
        "top_k": top_k,
        **{f"adherence_{k}": v for k, v in scores.items() if k != "counted"},
        "frechet_generated_vs_real": judge.frechet(images, real.float() / 255.0),
        "generation_seconds": round(seconds, 1),
    }


FEW_SHOT = 32  # solved problems before each prompt: 425 tokens when zero-padded


def evaluate_arith_mdlm_fewshot(
    num_problems: int = 200,
    folder: Path | None = None,
    shots: int = FEW_SHOT,
    batch_size: int = 50,
) -> dict[str, Any]:
    """Exact-answer accuracy after a `shots`-problem context (`held_out_few_shot`), and without.

    Every problem zero-padded, as arith-mdlm-fewshot was trained (``train_arith_mdlm
    --context-shots N --zero-pad``); low-confidence remasking, steps = answer window
    length, as for arith-mdlm.
    """
    pipe = mdlm_pipeline(folder or zoo_path("arith-mdlm-fewshot"))
    tokenizer = pipe.tokenizer

    def accuracy(problems: list[tuple[str, str]]) -> float:
        correct = 0
        for i in range(0, len(problems), batch_size):
            batch = problems[i : i + batch_size]
            answers = mdlm_answers(pipe, [p for p, _ in batch])
            correct += sum(a == want for a, (_, want) in zip(answers, batch))
        return correct / len(problems)

    few_shot = held_out_few_shot(num_problems, shots, padded=True)
    return {
        "num_problems": num_problems,
        "shots": shots,
        "prompt_tokens_mean": sum(len(tokenizer(p).input_ids) for p, _ in few_shot) / num_problems,
        "exact_answers_few_shot": accuracy(few_shot),
        "exact_answers_zero_shot": accuracy(held_out_few_shot(num_problems, 0, padded=True)),
        "decoding": f"low-confidence remasking, {ANSWER_LENGTH} steps",
    }


EVALUATIONS = {
    "shapes-judge": evaluate_shapes_judge,
    "shapes-sd": evaluate_shapes_sd,
    "shapes-dit": evaluate_shapes_dit,
    "arith-ar": evaluate_arith_ar,
    "arith-mdlm": evaluate_arith_mdlm,
    "arith-mdlm-windows": evaluate_arith_mdlm_windows,
    "arith-mdlm-fewshot": evaluate_arith_mdlm_fewshot,
    "shapes-vq": evaluate_shapes_vq,
    "shapes-ar": evaluate_shapes_ar,
}


def main(argv: list[str] | None = None) -> None:
    """Command line: evaluate one zoo model (or a folder with --folder) and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(EVALUATIONS))
    parser.add_argument("--folder", type=Path, default=None, help="default: the zoo's copy")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(EVALUATIONS[args.model](folder=args.folder), indent=1))


if __name__ == "__main__":
    main()
