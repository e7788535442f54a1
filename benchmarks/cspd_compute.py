"""What cspd costs on the zoo's MAR shapes when every draft is accepted (compute only).

Builds two random-weight MARs with the zoo's shapes (16 tokens of 16 numbers over
shapes-sd's VAE, a 100-step head; the small one as the draft), saves them as mar
folders in a temporary directory and runs ``decodekit bench`` for both acceptance
rules. MAR starts its heads' output layers at zero, so two freshly built heads
predict the same noise and both rules keep every draft: the figures are the
strategy's cost at 100% acceptance, the most it can save on this loop. Compute
does not depend on the weights' values.

    python benchmarks/cspd_compute.py            # JSON/PNG under benchmarks/results/cspd/cpu-2core/

``--released`` builds the released models' shapes instead: MAR-B drafting for
MAR-L (``PRESETS``) at 256 px over a random KL-16 autoencoder (256 tokens of 16
numbers), 1000 classes, on a GPU (about 0.2 + 0.5 B parameters in bfloat16):

    python benchmarks/cspd_compute.py --released --device cuda --dtype bfloat16 \\
        --rows 32 --num-iter 64 --repeat 2 --out <folder>
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


# LTH14/mar's KL-16 autoencoder (ch 128, ch_mult 1 1 2 2 4, 2 blocks a level, 16 latent channels)
KL16 = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, act_fn="silu",
    block_out_channels=[128, 128, 256, 256, 512], down_block_types=["DownEncoderBlock2D"] * 5,
    up_block_types=["UpDecoderBlock2D"] * 5, norm_num_groups=32, sample_size=256,
    mid_block_add_attention=True,
)  # fmt: skip


def build(folder: Path, released: bool = False) -> None:
    from decodekit.config import resolve_model
    from decodekit.pipelines.mar import PRESETS, MARConfig, MARModel
    from decodekit.pipelines.mar_pipeline import MARPipeline
    from diffusers import AutoencoderKL

    if released:  # MARConfig's defaults are the released 256 px models' (KL-16, 1000 classes)
        torch.manual_seed(0)
        vae = AutoencoderKL(**KL16)
        sizes = {"target": PRESETS["mar_large"], "draft": PRESETS["mar_base"]}
        shapes: dict = {}
    else:
        vae = AutoencoderKL.from_pretrained(Path(resolve_model("zoo:shapes-sd")) / "vae")
        sizes, shapes = SIZES, SHAPES
    for seed, (role, dims) in enumerate(sizes.items()):
        torch.manual_seed(seed)
        config = MARConfig(**shapes, **dims)
        model = MARModel(config)
        names = [f"class {i}" for i in range(config.class_num)]
        MARPipeline(model, vae, names).save_pretrained(folder / role)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cspd/cpu-2core")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--released", action="store_true", help="MAR-B drafting for MAR-L at 256 px (GPU)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rows", type=int, default=8, help="class rows per call")
    parser.add_argument("--num-iter", type=int, default=8, help="MAR steps")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build(tmp, args.released)
        target = str(tmp / "target")
        config = {
            "pipeline": {
                "type": "mar",
                "model": target,
                "device": args.device,
                "dtype": args.dtype,
            },
            "strategies": [{"name": "cspd", "params": {"draft": str(tmp / "draft"), "gamma": 4}}],
            "inputs": {
                "prompt": list(range(args.rows)),
                "num_iter": args.num_iter,
                "cfg": 3.0,
                "cfg_schedule": "linear",
                "temperature": 1.0,
                "batch_size": args.rows,
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
                sys.executable, "-m", "decodekit.cli", "bench", str(path),
                "--threads", str(args.threads),
                "--set", f"strategies.0.params.acceptance={acceptance}",
                "--json", f"{stem}.json", "--png", f"{stem}.png",
            ]  # fmt: skip
            subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
