"""What cspd costs on the zoo's MAR shapes when every draft is accepted (compute only).

Builds two random-weight MARs with the zoo's shapes (16 tokens of 16 numbers over
shapes-sd's VAE, a 100-step head; the small one as the draft), saves them as mar
folders in a temporary directory and runs ``decodekit bench`` for both acceptance
rules. MAR starts its heads' output layers at zero, so two freshly built heads
predict the same noise and both rules keep every draft: the figures are the
strategy's cost at 100% acceptance, the most it can save on this loop. Compute
does not depend on the weights' values.

    python benchmarks/cspd_compute.py            # JSON/PNG under benchmarks/results/cspd/cpu-2core/
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
# the zoo's sizes (shapes-mar and shapes-mar-small): 32 px renders, shapes-sd's 4x8x8 latents in
# 2x2 patches, 24 classes, a 100-step head
SHAPES = dict(
    img_size=32, vae_stride=4, patch_size=2, vae_embed_dim=4, class_num=24, buffer_size=4,
    num_sampling_steps="100", attn_dropout=0.0, proj_dropout=0.0,
)  # fmt: skip
SIZES = {
    "target": dict(
        encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4,
        decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, diffloss_w=128, diffloss_d=3,
    ),
    "draft": dict(
        encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, diffloss_w=64, diffloss_d=2,
    ),
}  # fmt: skip


def build(folder: Path) -> None:
    from decodekit.config import resolve_model
    from decodekit.pipelines.mar import MARConfig, MARModel
    from decodekit.pipelines.mar_pipeline import MARPipeline
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(resolve_model("zoo:shapes-sd")) / "vae")
    for seed, (role, dims) in enumerate(SIZES.items()):
        torch.manual_seed(seed)
        model = MARModel(MARConfig(**SHAPES, **dims))
        names = [f"class {i}" for i in range(SHAPES["class_num"])]
        MARPipeline(model, vae, names).save_pretrained(folder / role)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cspd/cpu-2core")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build(tmp)
        config = {
            "pipeline": {"type": "mar", "model": str(tmp / "target"), "dtype": "float32"},
            "strategies": [{"name": "cspd", "params": {"draft": str(tmp / "draft"), "gamma": 4}}],
            "inputs": {
                "prompt": list(range(8)),
                "num_iter": 8,
                "cfg": 3.0,
                "cfg_schedule": "linear",
                "temperature": 1.0,
                "seed": 0,
            },
            "output": {"dir": str(tmp / "out")},
            "bench": {"repeat": args.repeat, "warmup": 1},
        }
        path = tmp / "cspd-compute.yaml"
        path.write_text(yaml.safe_dump(config))
        for acceptance in ("paper", "exact"):
            stem = args.out / f"compute_{acceptance}"
            command = [
                sys.executable, "-m", "decodekit.cli", "bench", str(path), "--threads", "1",
                "--set", f"strategies.0.params.acceptance={acceptance}",
                "--json", f"{stem}.json", "--png", f"{stem}.png",
            ]  # fmt: skip
            subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
