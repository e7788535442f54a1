"""Model families of `ARImagePipeline`: transformers image-generation models run through their own modules.

A family object tells the pipeline how one transformers class lays out its
image span: the LM token id of each decoder code (``token_ids``), how prompts
are built (`encode_prompts`), which codes each image position allows
(`position_constraint`) and how codes become pixels (`decode_codes`). The LM
forward, its cache, the vocabulary mapping and the VQ decoder are the
model's own; nothing here copies a forward.

`from_transformers` builds an `ARImagePipeline` around a loaded model and
picks the family from ``model.config.model_type``; a model it cannot handle
gets a ``ValueError`` naming what is supported.

Emu3 (``Emu3ForConditionalGeneration``): the prompt is what ``Emu3Processor``
gives with ``return_for_image_generation=True`` (caption, begin-of-image,
``"{H}*{W}"``, the image-wrapper token); the image span is ``H`` rows of ``W``
visual tokens each followed by the end-of-line token ``<|extra_200|>``. The
decoder's codes are the ``K`` VQ codes (LM ids through the model's
``vocabulary_mapping.img2bpe``) and code ``K``, end-of-line; the position
constraint allows only visual tokens inside a row and only end-of-line at each
row's end, as the prefix-constrained processor of Emu3's image generation
does. Pixels come from the model's ``decode_image_tokens``.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SUPPORTED", "Emu3Family", "from_transformers"]

SUPPORTED = {"emu3": "Emu3ForConditionalGeneration"}
"""model_type -> the transformers class the pipeline runs through its own modules."""

_CANNOT = {
    "chameleon": "transformers' Chameleon cannot generate images (its image-token logits are "
    "masked to -inf and its VQ has no decoder)",
    "janus": "Janus's image mode (generation_head, its own loop) is not wired into the pipeline yet",
}


class Emu3Family:
    """Emu3's image span: ``H x (W + 1)`` positions, end-of-line at each row's end.

    Args:
        model: an ``Emu3ForConditionalGeneration``.
        processor: its ``Emu3Processor`` (builds the prompts).
        image_area: passed to the processor (pixels; ``H, W`` are its
            ``calculate_generate_size`` at ratio 1:1, a downsample of 8).
    """

    name = "emu3"

    def __init__(self, model: Any, processor: Any, *, image_area: int):
        mapping = model.vocabulary_mapping
        img2bpe = mapping.img2bpe
        k = len(img2bpe)
        if sorted(img2bpe) != list(range(k)) or mapping.eol_token_id is None:
            raise ValueError(
                "this Emu3 vocabulary_map does not hold visual tokens 0..K-1 and <|extra_200|>."
            )
        self.model = model
        self.processor = processor
        self.image_area = int(image_area)
        probe = processor(text=[""], return_for_image_generation=True, image_area=self.image_area)
        self.height, self.width = (int(x) for x in probe["image_sizes"][0])
        self.codebook_size = k
        self.eol_code = k
        ids = [img2bpe[c] for c in range(k)] + [mapping.eol_token_id]
        self.token_ids = torch.tensor(ids, dtype=torch.long)  # (K + 1,) LM id of each decoder code
        tok = processor.tokenizer
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    @property
    def image_tokens(self) -> tuple[int, int]:
        """Decoder positions: H rows of W codes and one end-of-line."""
        return self.height, self.width + 1

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt as ``Emu3Processor(return_for_image_generation=True)`` builds them."""
        out = self.processor(
            text=list(prompts), return_for_image_generation=True, image_area=self.image_area
        )
        return [list(map(int, row)) for row in out["input_ids"]]

    def encode_prompts(self, prompts: list[str], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.prompt_ids(prompts)
        longest = max(len(r) for r in rows)
        if longest > width:
            raise ValueError(f"a prompt is {longest} tokens; this pipeline takes at most {width}.")
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
        return ids, mask

    def position_constraint(self, positions: torch.Tensor) -> torch.Tensor:
        """``(B, n)`` positions -> ``(B, n, K + 1)``: visual codes inside a row, end-of-line at its end."""
        row_end = (positions % (self.width + 1)) == self.width  # (B, n)
        is_eol = torch.arange(self.codebook_size + 1, device=positions.device) == self.eol_code
        return row_end[..., None] == is_eol  # (B, n, K + 1)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> list[Any]:
        """PIL images through the model's own ``decode_image_tokens`` (codes: decoder codes ``(B, H*(W+1))``)."""
        from diffusers.image_processor import VaeImageProcessor

        device = next(self.model.parameters()).device
        bpe = self.token_ids.to(device)[codes.to(device)]  # (B, H*(W+1))
        tail = bpe.new_zeros(bpe.shape[0], 3)  # EOF, EOI, EOS: decode_image_tokens drops them
        pixels = self.model.decode_image_tokens(
            image_tokens=torch.cat([bpe, tail], dim=1), height=self.height, width=self.width
        )
        return VaeImageProcessor(do_resize=False).postprocess(pixels.float(), output_type="pil")


def from_transformers(
    model: Any,
    processor: Any,
    *,
    image_area: int | None = None,
    max_prompt_tokens: int = 64,
    null_prompt: str = "",
    **kwargs: Any,
):
    """An `ARImagePipeline` around a transformers image-generation model and its processor.

    Supported: ``Emu3ForConditionalGeneration`` (``image_area``: pixels of the
    image, as its processor takes it). Anything else is a ``ValueError`` that
    says why and what is supported.
    """
    from decodekit.pipelines.ar_image import ARImageConfig, ARImagePipeline

    kind = getattr(getattr(model, "config", None), "model_type", None)
    cls_name = type(model).__name__
    if kind != "emu3" or cls_name != SUPPORTED["emu3"]:
        why = _CANNOT.get(kind, f"{cls_name} (model_type {kind!r}) is not an image-token model "
                          "the pipeline knows")  # fmt: skip
        raise ValueError(
            f"ARImagePipeline cannot run {cls_name}: {why}. Supported transformers classes: "
            f"{', '.join(SUPPORTED.values())}; other models load as an ar-image folder "
            "(ar_image.json, lm/, vq/, tokenizer/) or through `decodekit convert-llamagen`."
        )
    if image_area is None:
        raise ValueError("Emu3 needs image_area (pixels), as its processor takes it.")
    family = Emu3Family(model, processor, image_area=image_area)
    first = int(family.token_ids[0])
    config = ARImageConfig(
        image_tokens=family.image_tokens,
        code_offset=first,  # informational: the decoder maps codes through family.token_ids
        codebook_size=family.codebook_size + 1,
        boi_token_id=processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.boi_token),
        pad_token_id=family.pad_token_id,
        max_prompt_tokens=max_prompt_tokens,
        null_prompt=null_prompt,
    )
    return ARImagePipeline(model, None, processor.tokenizer, config, family=family, **kwargs)
