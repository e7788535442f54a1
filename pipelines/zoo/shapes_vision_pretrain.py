"""Pretrain `shapes-vlm`'s CLIP vision tower as a classifier of `shapes` renders.

LLaVA starts from a CLIP tower that already sees; `shapes-vlm` has no such tower to
download, so this stage makes one. The tower is the exact ``CLIPVisionModel`` of
`train_shapes_vlm.shapes_vlm_config` (same patch size, width and depth). Three linear
heads read the mean of its last layer's patch features (the features LLaVA's projector
gets: ``vision_feature_layer=-1``, the class token dropped) and classify the render's
shape, colour and position; the loss is the sum of the three cross-entropies. Training
uses `shapes_vqa`'s ``train`` split renders (one-shape scenes, the trainer's own images)
and reports held-out accuracy on the ``selection`` split. The heads are thrown away; the
tower's weights are saved as safetensors, which the trainer loads with
``--vision-init``::

    python -m decodekit.pipelines.zoo.shapes_vision_pretrain --patch-size 2 \\
        --out /tmp/shapes-vision/vision_tower.safetensors
    python -m decodekit.pipelines.zoo.train_shapes_vlm train --patch-size 2 \\
        --vision-init /tmp/shapes-vision/vision_tower.safetensors --out ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from decodekit.pipelines.zoo.shapes_data import COLOUR_NAMES, POSITIONS, SHAPES
from decodekit.pipelines.zoo.shapes_vqa import ATTRIBUTES, VQAItem, answer_of, vqa_items
from decodekit.pipelines.zoo.train_shapes_vlm import (
    DIMS,
    pixel_values,
    shapes_vlm_config,
    shapes_vlm_processor,
    share_report,
)
from decodekit.pipelines.zoo.training import adamw_warmup_cosine, optimiser_step
from torch import nn
from tqdm import tqdm

CLASSES = {"shape": SHAPES, "colour": COLOUR_NAMES, "position": POSITIONS}
"""Each head's classes, in `ATTRIBUTES` order of heads."""


class TowerClassifier(nn.Module):
    """A CLIP vision tower with one linear head per kind over its mean patch feature."""

    def __init__(self, patch_size: int, vision_width: int, vision_layers: int):
        super().__init__()
        from transformers import CLIPVisionModel

        config = shapes_vlm_config(
            patch_size=patch_size, vision_width=vision_width, vision_layers=vision_layers
        ).vision_config
        self.tower = CLIPVisionModel._from_config(config, attn_implementation="sdpa")
        self.norm = nn.LayerNorm(vision_width)
        self.heads = nn.ModuleList(nn.Linear(vision_width, len(CLASSES[k])) for k in ATTRIBUTES)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Each kind's logits, [(B, classes)] in `ATTRIBUTES` order."""
        hidden = self.tower(pixel_values=pixels).last_hidden_state  # (B, 1 + patches, W)
        pooled = self.norm(hidden[:, 1:].mean(1))  # (B, W): patch tokens only, as LLaVA reads
        return [head(pooled) for head in self.heads]


def labels_of(items: list[VQAItem]) -> torch.Tensor:
    """Each item's class index per kind: (N, 3) in `ATTRIBUTES` order."""
    return torch.tensor(
        [[CLASSES[k].index(answer_of(it.scene, k)) for k in ATTRIBUTES] for it in items]
    )


@torch.no_grad()
def classifier_accuracy(model: TowerClassifier, pixels, labels, batch_size: int = 200) -> dict:
    """Share right per kind and their mean ("overall")."""
    was_training = model.training
    model.eval()
    right = torch.zeros(len(ATTRIBUTES))
    for i in range(0, len(labels), batch_size):
        logits = model(pixels[i : i + batch_size])
        for k, lg in enumerate(logits):
            right[k] += (lg.argmax(-1) == labels[i : i + batch_size, k]).sum()
    model.train(was_training)
    return share_report(right, len(labels), ATTRIBUTES)


def pretrain_vision(
    out: Path,
    *,
    patch_size: int = DIMS["patch_size"],
    vision_width: int = DIMS["vision_width"],
    vision_layers: int = DIMS["vision_layers"],
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup: int = 100,
    weight_decay: float = 0.05,
    num_images: int = 20000,
    seed: int = 0,
    check_every: int = 250,
    command: str | None = None,
) -> dict:
    """Train the tower and its heads; save the tower's state dict (safetensors) to `out`.

    Writes ``<out stem>.json`` beside it with the settings and the held-out accuracies,
    and returns that record.
    """
    from safetensors.torch import save_file

    started = time.time()
    processor = shapes_vlm_processor(patch_size)
    train_items = vqa_items(num_images, seed, "train")
    held_items = vqa_items(240, 0, "selection")
    train_pixels, train_labels = pixel_values(processor, train_items), labels_of(train_items)
    held_pixels, held_labels = pixel_values(processor, held_items), labels_of(held_items)
    data_seconds = round(time.time() - started, 1)

    torch.manual_seed(seed)
    model = TowerClassifier(patch_size, vision_width, vision_layers).train()
    optimizer, schedule = adamw_warmup_cosine(
        model.parameters(), lr=lr, weight_decay=weight_decay, warmup=warmup, steps=steps
    )
    generator = torch.Generator().manual_seed(seed + 1)
    checks = []
    bar = tqdm(range(steps), desc="shapes-vision", mininterval=30)
    for step in bar:
        rows = torch.randint(0, len(train_labels), (batch_size,), generator=generator)
        logits = model(train_pixels[rows])
        labels = train_labels[rows]  # (B, 3)
        loss = sum(F.cross_entropy(lg, labels[:, k]) for k, lg in enumerate(logits))
        optimiser_step(loss, optimizer, schedule, bar, clip_params=model.parameters())
        done = step + 1
        if done % check_every == 0 or done == steps:
            check = classifier_accuracy(model, held_pixels, held_labels)
            checks.append({"step": done, "minutes": round((time.time() - started) / 60, 2)} | check)
            tqdm.write(f"step {done}: loss {loss.item():.4f}, held-out {check}")

    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.tower.state_dict().items()}
    save_file(state, str(out))
    record = {
        "command": command
        or f"python -m decodekit.pipelines.zoo.shapes_vision_pretrain --out {out}",
        "seed": seed,
        "dims": {
            "patch_size": patch_size,
            "vision_width": vision_width,
            "vision_layers": vision_layers,
        },
        "tower_parameters": sum(p.numel() for p in model.tower.parameters()),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "schedule": f"AdamW (0.9, 0.98), weight decay {weight_decay}, {warmup} steps linear "
        "warm-up then cosine to 0, clip 1.0",
        "num_images": num_images,
        "held_out": "shapes_vqa selection split, 240 renders",
        "data_seconds": data_seconds,
        "train_minutes": round((time.time() - started) / 60, 2),
        "torch_threads": torch.get_num_threads(),
        "checks": checks,
        "final": checks[-1] if checks else None,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def load_vision_init(model, path: str | Path) -> None:
    """Load a `pretrain_vision` safetensors file into a shapes-vlm model's vision tower."""
    from safetensors.torch import load_file

    tower = model.model.vision_tower
    state = load_file(str(path))
    expected = tower.state_dict()
    wrong = [k for k, v in state.items() if k not in expected or expected[k].shape != v.shape]
    if wrong or len(state) != len(expected):
        raise ValueError(
            f"{path} does not fit this model's vision tower (mismatched keys: {wrong[:3]}); "
            "pretrain it with the same --patch-size, --vision-width and --vision-layers."
        )
    tower.load_state_dict(state)


def main(argv: list[str] | None = None) -> None:
    """Command line: pretrain the tower and print the record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--num-images", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    for dim in ("patch_size", "vision_width", "vision_layers"):
        parser.add_argument("--" + dim.replace("_", "-"), type=int, default=DIMS[dim])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = " ".join(
        ["python -m decodekit.pipelines.zoo.shapes_vision_pretrain", *(argv or sys.argv[1:])]
    )
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "threads")}
    record = pretrain_vision(args.out, command=command, **settings)
    print(json.dumps(record["final"]))


if __name__ == "__main__":
    main()
