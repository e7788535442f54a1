"""The reference zoo: tiny models trained here on synthetic data, shipped inside the package.

Each model is a folder under ``models/`` that the standard loader of diffusers or
transformers reads (``StableDiffusionPipeline.from_pretrained``,
``AutoModelForCausalLM.from_pretrained``, ...). ``zoo:<name>`` strings in a config resolve
through `zoo_path`; ``decodekit zoo list`` prints `list_models`. How each model was trained
and the gates it was measured against are in docs/zoo.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from decodekit.errors import UnknownNameError

MODELS_DIR = Path(__file__).parent / "models"


@dataclass(frozen=True)
class ZooModel:
    """One catalogue entry: what the model is, which loader reads it, what it must reach.

    Attributes:
        name: the zoo name, as written in ``zoo:<name>``.
        description: one line on what the model is and what it was trained on.
        loader: the pipeline adapter or loader that reads the folder ("stable-diffusion",
            "causal-lm", "masked-diffusion-lm", "shapes-judge", "ngram").
        trainer: the module that retrains it (``python -m <trainer> --out DIR``).
        gates: the quality gates, {metric: minimum}, measured by
            ``python -m decodekit.pipelines.zoo.evaluate <name>``.
        folder: the folder under ``models/`` when it is not `name` (``shapes-vq`` is
            ``shapes-ar/vq``: one copy of the weights).
    """

    name: str
    description: str
    loader: str
    trainer: str
    gates: dict[str, float] = field(default_factory=dict)
    folder: str | None = None

    @property
    def path(self) -> Path:
        """The model's folder inside the installed package."""
        return MODELS_DIR / (self.folder or self.name)

    @property
    def size_mb(self) -> float:
        """Size of the folder on disk in MB (0 when it is absent)."""
        if not self.path.is_dir():
            return 0.0
        total = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        return round(total / 1e6, 2)


CATALOGUE: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel(
            "shapes-sd",
            "Latent text-to-image diffusion (AutoencoderKL, CLIP text encoder, cross-attention "
            "UNet, DDIM) on 32x32 coloured-shape renders with captions.",
            "stable-diffusion",
            "decodekit.pipelines.zoo.train_shapes_sd",
            {"adherence_shape": 0.90, "adherence_colour": 0.90},
        ),
        ZooModel(
            "shapes-dit",
            "Flux-shaped text-to-image diffusion transformer (2 double + 3 single blocks, width "
            "64, a 2-layer T5) trained by rectified flow on shapes-sd's frozen VAE and CLIP "
            "text encoder; 32x32 shape renders with captions.",
            "diffusion-transformer",
            "decodekit.pipelines.zoo.train_shapes_dit",
            {"adherence_shape": 0.90, "adherence_colour": 0.90},
        ),
        ZooModel(
            "shapes-judge",
            "timm classifier of shape, colour, position and size on shape renders; scores "
            "prompt adherence and a Fréchet distance on its features.",
            "shapes-judge",
            "decodekit.pipelines.zoo.train_shapes_judge",
            {"accuracy_shape": 0.98, "accuracy_colour": 0.98, "accuracy_position": 0.98},
        ),
        ZooModel(
            "arith-ar",
            "Causal Llama (3 layers, width 128) with a character tokenizer, trained on "
            "multi-digit sums and differences and short sentences.",
            "causal-lm",
            "decodekit.pipelines.zoo.train_arith_ar",
            {"exact_answers": 0.90},
        ),
        ZooModel(
            "arith-mdlm",
            "Bidirectional Llama trained as a masked diffusion LM (LLaDA-style) on the same "
            "arithmetic and sentences, with a <mask> token; adapted from arith-ar, answers "
            "padded with <eos> to windows of up to 256 tokens.",
            "masked-diffusion-lm",
            "decodekit.pipelines.zoo.train_arith_mdlm",
            {"exact_answers": 0.80},
        ),
        ZooModel(
            "arith-mdlm-fewshot",
            "arith-mdlm trained further, in three runs, on zero-padded problems "
            "(417+085=0502) after few-shot contexts of up to 36 solved problems (about 480 "
            "tokens): a long-prompt diffusion LM, for measuring prompt caches (dkv-cache).",
            "masked-diffusion-lm",
            "decodekit.pipelines.zoo.train_arith_mdlm",
            {"exact_answers_few_shot": 0.85},
        ),
        ZooModel(
            "arith-ngram",
            "Token n-gram counts (orders 2-6) of the arith corpus under arith-ar's tokenizer, "
            "for superposed decoding (safetensors arrays, no pickle).",
            "ngram",
            "decodekit.pipelines.zoo.build_arith_ngram",
        ),
        ZooModel(
            "shapes-vq",
            "VQModel image tokenizer (channels 16/32/32, codebook of 128 vectors of width 8): "
            "32x32 shape renders <-> 8x8 codes; the vq/ of shapes-ar, the same files.",
            "VQModel",
            "decodekit.pipelines.zoo.train_shapes_ar",
            {"adherence_overall": 0.85},
            folder="shapes-ar/vq",
        ),
        ZooModel(
            "shapes-ar",
            "Causal Llama (4 layers, width 128) over a left-padded caption, <boi> and the 64 "
            "shapes-vq codes of a 32x32 render (LlamaGen-style text-to-image; captions dropped "
            "20% for classifier-free guidance).",
            "ar-image",
            "decodekit.pipelines.zoo.train_shapes_ar",
            {"adherence_shape": 0.90, "adherence_colour": 0.90, "adherence_overall": 0.85},
        ),
        ZooModel(
            "shapes-msvq",
            "VAR's multi-scale residual VQ-VAE (widths 32/32/64, codebook of 128 vectors of "
            "width 16): 32x32 shape renders <-> token maps of sides 1, 2, 3, 4, 6, 8; the vq/ "
            "of shapes-var-d6 and shapes-var-d3, one copy.",
            "var-vqvae",
            "decodekit.pipelines.zoo.train_shapes_var",
            {"adherence_overall": 0.85},
        ),
        ZooModel(
            "shapes-var-d6",
            "Class-conditional VAR transformer (depth 6, width 96) over shapes-msvq's token "
            "maps; 24 classes, shape x colour ('red circle'); labels dropped 10% for guidance; "
            "CoDe's drafter.",
            "var",
            "decodekit.pipelines.zoo.train_shapes_var",
            {"adherence_shape": 0.90, "adherence_colour": 0.90},
        ),
        ZooModel(
            "shapes-var-d3",
            "Small class-conditional VAR transformer (depth 3, width 48) over shapes-msvq's "
            "token maps, trained on the scales from 4x4 on only; 24 classes, shape x colour "
            "('red circle'); CoDe's refiner.",
            "var",
            "decodekit.pipelines.zoo.train_shapes_var",
        ),
        ZooModel(
            "shapes-mar",
            "Class-conditional MAR (masked autoregression over continuous tokens: encoder and "
            "decoder of depth 2, width 64, a diffusion MLP head per token) over shapes-sd's "
            "VAE latents in 16 tokens of 16 numbers; 24 classes, shape x colour ('red "
            "circle'); CSpD's target.",
            "mar",
            "decodekit.pipelines.zoo.train_shapes_mar",
            {"adherence_shape": 0.90, "adherence_colour": 0.90},
        ),
        ZooModel(
            "shapes-mar-small",
            "Small class-conditional MAR (depth 1, width 32, a narrower head) on the same "
            "tokens and classes as shapes-mar; CSpD's draft.",
            "mar",
            "decodekit.pipelines.zoo.train_shapes_mar",
        ),
        ZooModel(
            "shapes-vlm",
            "Tiny LLaVA (a 2-layer CLIP vision tower over 4x4-pixel patches, pretrained as a "
            "classifier of the renders: 64 image tokens; a 16-layer Llama of width 64) "
            "answering one-word questions about one-shape renders: which shape, which "
            "colour, where.",
            "vlm",
            "decodekit.pipelines.zoo.train_shapes_vlm",
            {"accuracy_overall": 0.90},
        ),
    )
}


def zoo_path(name: str) -> Path:
    """The folder of zoo model `name`; raises UnknownNameError for a name not in the zoo."""
    if name not in CATALOGUE:
        raise UnknownNameError("model", "zoo model", name, list(CATALOGUE))
    return CATALOGUE[name].path


def list_models() -> list[dict[str, Any]]:
    """Every zoo model as a plain dict: name, description, loader, size_mb, gates."""
    return [
        {
            "name": m.name,
            "description": m.description,
            "loader": m.loader,
            "size_mb": m.size_mb,
            "gates": dict(m.gates),
        }
        for m in CATALOGUE.values()
    ]
