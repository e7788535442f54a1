"""`shapes-judge`: a timm classifier that reads shape, colour, position and size off a render.

It scores generated images: `adherence` (does the image show what the prompt asked for)
and `frechet` (the Fréchet distance between two image sets on its penultimate features).
The network is ``timm.create_model(arch, pretrained=False, in_chans=5, num_classes=17)``:
RGB plus two coordinate channels (so that position survives global pooling), and one
logit block per attribute head.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import timm
import torch
from decodekit.pipelines.zoo.shapes_data import (
    COLOUR_NAMES,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZES,
    parse_caption,
)
from PIL import Image
from safetensors.torch import load_file, save_file

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOUR_NAMES,
    "position": POSITIONS,
    "size": SIZES,
}
DEFAULT_ARCH = "test_resnet"
ImageBatch = torch.Tensor | Sequence[Image.Image] | Sequence[torch.Tensor]


def to_tensor_batch(images: ImageBatch) -> torch.Tensor:
    """PIL images or tensors in [0, 1] as one float batch (B, 3, 32, 32) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        batch = images if images.dim() == 4 else images.unsqueeze(0)
        batch = batch.float()
    else:
        rows = []
        for image in images:
            if isinstance(image, Image.Image):
                array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
                rows.append(torch.from_numpy(array).permute(2, 0, 1))  # (3, H, W)
            else:
                rows.append(image.float())
        batch = torch.stack(rows)
    if batch.shape[-1] != IMAGE_SIZE or batch.shape[-2] != IMAGE_SIZE:
        batch = torch.nn.functional.interpolate(
            batch, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True
        )
    return batch.clamp(0, 1)


def with_coordinates(batch: torch.Tensor) -> torch.Tensor:
    """Normalise RGB to [-1, 1] and append x and y coordinate planes: (B, 5, H, W)."""
    b, _, h, w = batch.shape
    ys = torch.linspace(-1, 1, h).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.linspace(-1, 1, w).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([batch * 2 - 1, xs, ys], dim=1)


def build_judge_network(arch: str = DEFAULT_ARCH) -> torch.nn.Module:
    """The timm network, untrained, with one logit per class of every attribute."""
    num_classes = sum(len(v) for v in ATTRIBUTES.values())
    return timm.create_model(arch, pretrained=False, in_chans=5, num_classes=num_classes)


def split_logits(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cut the (B, 17) logits into one (B, n_classes) block per attribute."""
    heads, start = {}, 0
    for name, classes in ATTRIBUTES.items():
        heads[name] = logits[:, start : start + len(classes)]
        start += len(classes)
    return heads


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D)."""
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(Ca Cb) = tr sqrt(Ca^1/2 Cb Ca^1/2), a symmetric PSD matrix
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    middle = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    value = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * middle
    return float(value)


class ShapesJudge:
    """The trained shapes classifier, with prompt adherence and Fréchet distance."""

    def __init__(self, network: torch.nn.Module, arch: str = DEFAULT_ARCH):
        self.network = network.eval()
        self.arch = arch

    @classmethod
    def load(cls, folder: str | Path | None = None) -> ShapesJudge:
        """Load the judge from `folder` (default: the zoo's shapes-judge)."""
        if folder is None:
            from decodekit.pipelines.zoo import zoo_path

            folder = zoo_path("shapes-judge")
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        network = build_judge_network(config["arch"])
        network.load_state_dict(
            {k: v.float() for k, v in load_file(folder / "model.safetensors").items()}
        )
        return cls(network, config["arch"])

    def save(self, folder: str | Path) -> None:
        """Write model.safetensors (fp16) and config.json to `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            k: v.detach().half().contiguous() if v.is_floating_point() else v
            for k, v in self.network.state_dict().items()
        }
        save_file(state, folder / "model.safetensors")
        config = {
            "arch": self.arch,
            "in_chans": 5,
            "image_size": IMAGE_SIZE,
            "attributes": {k: list(v) for k, v in ATTRIBUTES.items()},
        }
        (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")

    @torch.no_grad()
    def logits(self, images: ImageBatch, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Per-attribute logits for the images: {attribute: (B, n_classes)}."""
        batch = to_tensor_batch(images)
        chunks = [
            self.network(with_coordinates(batch[i : i + batch_size]))
            for i in range(0, len(batch), batch_size)
        ]
        return split_logits(torch.cat(chunks))

    def predict(self, images: ImageBatch) -> list[dict[str, str]]:
        """The predicted attributes of each image: [{"shape": "circle", "colour": ...}]."""
        heads = {k: v.argmax(-1).tolist() for k, v in self.logits(images).items()}
        return [
            {k: ATTRIBUTES[k][heads[k][i]] for k in ATTRIBUTES}
            for i in range(len(next(iter(heads.values()))))
        ]

    def adherence(self, images: ImageBatch, prompts: Sequence[str]) -> dict[str, float | int]:
        """Fraction of images whose predicted attributes match their prompt's.

        Returns one fraction per attribute and ``overall`` (all attributes match), over the
        prompts that name one shape; ``counted`` says how many that was (two-shape prompts
        are not judged).
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        predictions = self.predict(images)
        hits = {k: 0 for k in ATTRIBUTES} | {"overall": 0}
        counted = 0
        for prediction, prompt in zip(predictions, prompts):
            scene = parse_caption(prompt)
            if scene is None or len(scene.objects) != 1:
                continue
            counted += 1
            wanted = scene.objects[0]
            matches = {k: prediction[k] == getattr(wanted, k) for k in ATTRIBUTES}
            for k, ok in matches.items():
                hits[k] += ok
            hits["overall"] += all(matches.values())
        result: dict[str, float | int] = {k: v / max(counted, 1) for k, v in hits.items()}
        result["counted"] = counted
        return result

    @torch.no_grad()
    def features(self, images: ImageBatch, batch_size: int = 256) -> torch.Tensor:
        """Penultimate (pooled, pre-logits) features: (B, D)."""
        batch = to_tensor_batch(images)
        chunks = []
        for i in range(0, len(batch), batch_size):
            x = self.network.forward_features(with_coordinates(batch[i : i + batch_size]))
            chunks.append(self.network.forward_head(x, pre_logits=True))
        return torch.cat(chunks)

    def frechet(self, images_a: ImageBatch, images_b: ImageBatch) -> float:
        """Fréchet distance between two image sets on the judge's penultimate features."""
        return frechet_distance(self.features(images_a), self.features(images_b))
