"""Diverse beam search: decodekit's `diverse-beam` on transformers 5 vs transformers 4.55.4's built-in group beam search.

transformers 4.55.4 runs in its own virtual environment, made here on first use
(it reuses torch from the main venv and pins tokenizers / huggingface_hub to
versions 4.55.4 accepts); the tests never touch it. Both sides load the same
weights into a LlamaForCausalLM built from the same plain config, decode the
same prompts one at a time, and report every sequence, its score and the
median wall time per call over alternating rounds (4.55, ours, 4.55, ours ...).

    .venv/bin/python benchmarks/diverse_beam_vs_transformers455.py [--model zoo:arith-ar|tiny]

Writes benchmarks/results/diverse-beam/cpu-2core/diverse_beam_vs_transformers455[_<model>].json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = Path("/tmp/tf455")
MAIN_SITE = ROOT / ".venv/lib/python3.11/site-packages"
PLAIN_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act",
)  # fmt: skip
SETTINGS = dict(num_beams=6, num_beam_groups=3, diversity_penalty=0.5, max_new_tokens=12)


def ensure_venv() -> Path:
    """Create /tmp/tf455 with transformers 4.55.4 on top of the main venv's torch."""
    python = VENV / "bin/python"
    probe = [str(python), "-c", "import transformers; assert transformers.__version__ == '4.55.4'"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "venv", str(VENV)], check=True)
    (VENV / "lib/python3.11/site-packages/base.pth").write_text(str(MAIN_SITE) + "\n")
    subprocess.run(
        [str(VENV / "bin/pip"), "install", "-q", "--no-deps", "transformers==4.55.4",
         "tokenizers>=0.21,<0.22", "huggingface_hub>=0.34,<1.0"],
        check=True,
    )  # fmt: skip
    subprocess.run(probe, check=True)
    return python


def prepare(model: str, workdir: Path, n_prompts: int) -> dict:
    """Write weights + plain config + prompts into ``workdir``; returns a description."""
    import torch
    from safetensors.torch import save_file

    if model.startswith("zoo:"):
        from decodekit.pipelines.zoo import zoo_path
        from decodekit.pipelines.zoo.arith_data import held_out_problems
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = zoo_path(model[4:])
        lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        texts = [p for p, _ in held_out_problems(n_prompts)]
        prompts = [tok(t)["input_ids"] for t in texts]
        full = lm.config.to_dict()
        cfg = {k: full[k] for k in PLAIN_KEYS if k in full}
        rope = full.get("rope_theta") or (full.get("rope_parameters") or {}).get("rope_theta")
        if rope is not None:
            cfg["rope_theta"] = rope
        desc = f"{model} (trained; {sum(p.numel() for p in lm.parameters())} parameters)"
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = dict(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            bos_token_id=1, eos_token_id=18 if model == "tiny-eos" else 2, pad_token_id=63,
        )  # fmt: skip
        torch.manual_seed(0)
        lm = LlamaForCausalLM(LlamaConfig(**cfg))
        g = torch.Generator().manual_seed(1)
        # prompt tokens avoid pad (63) and both EOS choices (2, 18): a pad id inside a prompt is
        # masked, and transformers 5 then derives position ids from the mask where 4.55 did not
        prompts = [[1] + torch.randint(19, 63, (int(n),), generator=g).tolist()
                   for n in torch.randint(3, 9, (n_prompts,), generator=g)]  # fmt: skip
        texts = None
        desc = "tiny random LlamaForCausalLM (2 layers, hidden 32, vocab 64)"
        if model == "tiny-eos":
            desc += "; EOS = token 18, which it emits often, so hypotheses finish early"
    save_file(
        {k: v.detach().clone().contiguous() for k, v in lm.state_dict().items()},
        str(workdir / "weights.safetensors"),
    )  # clone: tied embeddings share memory
    (workdir / "setup.json").write_text(json.dumps({"config": cfg, "prompts": prompts}))
    return {"model": desc, "prompts_text": texts}


def worker(side: str, workdir: Path, repeats: int) -> None:
    """Run one side (``ours`` under transformers 5, ``tf455`` under 4.55.4); print JSON results."""
    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    setup = json.loads((workdir / "setup.json").read_text())
    model = LlamaForCausalLM(LlamaConfig(**setup["config"])).eval()
    model.load_state_dict(load_file(str(workdir / "weights.safetensors")), strict=False)
    model.tie_weights()
    s = SETTINGS
    kw = dict(
        max_new_tokens=s["max_new_tokens"], num_beams=s["num_beams"],
        num_return_sequences=s["num_beams"], do_sample=False,
        pad_token_id=setup["config"].get("pad_token_id", 0),
        return_dict_in_generate=True, output_scores=True,
    )  # fmt: skip
    run = None
    if side == "tf455":
        kw.update(num_beam_groups=s["num_beam_groups"], diversity_penalty=s["diversity_penalty"])
        transformers.logging.set_verbosity_error()
    else:
        import decodekit

        run = decodekit.attach(
            model,
            [{"name": "diverse-beam", "params": {
                "num_beam_groups": s["num_beam_groups"], "diversity_penalty": s["diversity_penalty"]}}],
        )  # fmt: skip
    results, times = [], []
    for prompt in setup["prompts"]:
        x = torch.tensor([prompt])
        model.generate(x, **kw)  # warm-up
        per = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(x, **kw)
            per.append(time.perf_counter() - t0)
        times.append(statistics.median(per))
        results.append(
            {"sequences": out.sequences.tolist(), "scores": out.sequences_scores.tolist()}
        )
    if run is not None:
        run.detach()
    print(json.dumps({"version": transformers.__version__, "results": results, "times": times}))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        default="auto",
        help="zoo:arith-ar, tiny, tiny-eos (a frequent token as EOS) or auto (arith-ar when present)",
    )
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per prompt per round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of both sides")
    ap.add_argument("--worker", choices=["ours", "tf455"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def run_rounds(python455: Path, workdir: Path, args: argparse.Namespace) -> dict[str, list[dict]]:
    """``args.rounds`` alternating rounds of both sides' workers: each side's parsed results."""
    sides = {"tf455": str(python455), "ours": str(ROOT / ".venv/bin/python")}
    runs: dict[str, list[dict]] = {"tf455": [], "ours": []}
    for _ in range(args.rounds):
        for side, python in sides.items():
            cmd = [
                python,
                __file__,
                "--worker",
                side,
                "--workdir",
                str(workdir),
                "--repeats",
                str(args.repeats),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs


def compare(runs: dict[str, list[dict]], setup: dict) -> dict:
    """Sequences and scores of the two sides, their times and early-finished sequences."""
    theirs, ours = runs["tf455"][0]["results"], runs["ours"][0]["results"]
    same = [a["sequences"] == b["sequences"] for a, b in zip(theirs, ours)]
    score_err = max(
        abs(x - y) for a, b in zip(theirs, ours) for x, y in zip(a["scores"], b["scores"])
    )

    def total(side: str) -> float:  # per prompt: the median over rounds; summed over prompts
        per_prompt = zip(*(r["times"] for r in runs[side]))
        return sum(statistics.median(t) for t in per_prompt)

    t455, tours = total("tf455"), total("ours")
    eos = setup["config"]["eos_token_id"]
    early = sum(
        eos in seq[len(p) :] for r, p in zip(ours, setup["prompts"]) for seq in r["sequences"]
    )
    return {
        "prompts": len(same),
        "identical_sequences": sum(same),
        "max_abs_score_difference": score_err,
        "returned_sequences_ending_in_eos": early,
        "returned_sequences": sum(len(r["sequences"]) for r in ours),
        "time_transformers_4_55_4_s": t455,
        "time_decodekit_s": tours,
        "time_ratio_ours_over_455": tours / t455,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.workdir, args.repeats)
        return 0

    model = args.model
    if model == "auto":
        from decodekit.pipelines.zoo import MODELS_DIR

        model = "zoo:arith-ar" if (MODELS_DIR / "arith-ar" / "config.json").is_file() else "tiny"
    python455 = ensure_venv()
    workdir = Path(tempfile.mkdtemp(prefix="dk-dbs-"))
    info = prepare(model, workdir, args.prompts)
    runs = run_rounds(python455, workdir, args)
    figures = compare(runs, json.loads((workdir / "setup.json").read_text()))
    report = {
        "model": info["model"],
        "settings": SETTINGS | {"num_return_sequences": SETTINGS["num_beams"], "batch": 1},
        **figures,
        "versions": {"theirs": runs["tf455"][0]["version"], "ours": runs["ours"][0]["version"]},
        "machine": "2-core CPU shared with other jobs, no GPU; torch.set_num_threads(1)",
        "command": "python benchmarks/diverse_beam_vs_transformers455.py --model " + args.model,
    }
    name = "diverse_beam_vs_transformers455" + ("" if model == "zoo:arith-ar" else f"_{model}")
    out_dir = ROOT / "benchmarks" / "results" / "diverse-beam" / "cpu-2core"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if figures["identical_sequences"] == figures["prompts"] else 1


if __name__ == "__main__":
    sys.exit(main())
