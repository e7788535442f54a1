"""Train `shapes-judge`: the timm classifier of shape, colour, position and size.

    python -m decodekit.pipelines.zoo.train_shapes_judge --out pipelines/zoo/models/shapes-judge

Trained on one-shape renders (seed 0 and up); evaluated on held-out renders from another
seed with ``python -m decodekit.pipelines.zoo.evaluate shapes-judge``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from decodekit.pipelines.zoo.shapes_data import ShapeScene, sample_shapes
from decodekit.pipelines.zoo.shapes_judge import (
    ATTRIBUTES,
    DEFAULT_ARCH,
    ShapesJudge,
    build_judge_network,
    split_logits,
    with_coordinates,
)
from decodekit.pipelines.zoo.training import optimiser_step, write_training_record
from tqdm import tqdm


def attribute_labels(scenes: list[ShapeScene]) -> dict[str, torch.Tensor]:
    """Class indices of each attribute of one-shape scenes: {attribute: (N,)}."""
    return {
        name: torch.tensor([classes.index(getattr(s.objects[0], name)) for s in scenes])
        for name, classes in ATTRIBUTES.items()
    }


def train(
    out: Path, steps: int, batch_size: int, num_images: int, seed: int, arch: str = DEFAULT_ARCH
) -> Path:
    """Train the judge on one-shape renders with a summed cross-entropy over the heads."""
    torch.manual_seed(seed)
    started = time.time()
    images, scenes = sample_shapes(num_images, seed=seed, two_shape_fraction=0.0)
    labels = attribute_labels(scenes)
    network = build_judge_network(arch)
    optimizer = torch.optim.AdamW(network.parameters(), lr=3e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, 3e-3, total_steps=max(steps, 1), pct_start=0.1
    )
    generator = torch.Generator().manual_seed(seed)
    network.train()
    bar = tqdm(range(steps), desc="shapes-judge")
    for _ in bar:
        idx = torch.randint(0, num_images, (batch_size,), generator=generator)
        x = images[idx].float() / 255.0  # (B, 3, 32, 32)
        # light noise so generated (slightly blurry, noisy) images are read like renders
        x = (x + 0.03 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
        heads = split_logits(network(with_coordinates(x)))
        loss = sum(F.cross_entropy(heads[k], labels[k][idx]) for k in ATTRIBUTES)
        optimiser_step(loss, optimizer, schedule, bar)
    judge = ShapesJudge(network, arch)
    judge.save(out)
    write_training_record(
        out, started, seed=seed, steps=steps, batch_size=batch_size, num_images=num_images
    )
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: train shapes-judge into --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-images", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train(args.out, args.steps, args.batch_size, args.num_images, args.seed)


if __name__ == "__main__":
    main()
