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

Janus (``JanusForConditionalGeneration``): its image mode is a loop of its own
(``generate(generation_mode="image")``); the pipeline drives that loop's steps
with the model's own modules instead. The prompt is what ``JanusProcessor``
gives with ``generation_mode="image"`` (caption, begin-of-image); a prompt token
is embedded by the text embeddings, an image code by
``prepare_embeddings_for_image_generation``; the language model
(``model.model.language_model``, with the decoder's cache) runs on those
``inputs_embeds`` and ``generation_head`` turns its hidden states into code
logits. Guidance is Janus's: the unconditional rows are the prompt with every
token but BOS and BOI replaced by pad (attended, as Janus does), combined as
``uncond + s * (cond - uncond)``. Pixels come from ``decode_image_tokens``.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SUPPORTED", "Emu3Family", "JanusFamily", "from_transformers"]

SUPPORTED = {"emu3": "Emu3ForConditionalGeneration", "janus": "JanusForConditionalGeneration"}
"""model_type -> the transformers class the pipeline runs through its own modules."""

_CANNOT = {
    "chameleon": "transformers' Chameleon cannot generate images (its image-token logits are "
    "masked to -inf and its VQ has no decoder)",
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
        self.num_codes = k + 1  # the decoder's codes: K visual tokens and end-of-line
        self.code_offset = ids[0]  # informational: the decoder maps codes through token_ids
        tok = processor.tokenizer
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.boi_token_id = tok.convert_tokens_to_ids(tok.boi_token)
        self.lm = model

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


class _JanusImageLM(torch.nn.Module):
    """Janus's image-generation step as a causal LM over ``[text ids, code_offset + codes]``.

    Text ids go through the text embeddings, codes through the model's
    ``prepare_embeddings_for_image_generation``; ``model.model.language_model``
    runs on the embeddings with the given cache and ``generation_head`` gives the
    code logits, placed at columns ``[code_offset, code_offset + K)``.
    """

    def __init__(self, model: Any, code_offset: int):
        super().__init__()
        self.janus = model
        self.code_offset = code_offset
        self.config = model.model.language_model.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None,
                use_cache=True, logits_to_keep=0):  # fmt: skip
        from types import SimpleNamespace

        janus = self.janus
        is_code = input_ids >= self.code_offset
        text = janus.get_input_embeddings()(input_ids.masked_fill(is_code, 0))
        codes = janus.prepare_embeddings_for_image_generation(
            (input_ids - self.code_offset).clamp(min=0)
        )
        embeds = torch.where(is_code[..., None], codes.to(text.dtype), text)
        out = janus.model.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        head = janus.model.generation_head(hidden)  # (R, W, K)
        return SimpleNamespace(logits=torch.nn.functional.pad(head, (self.code_offset, 0)))


class JanusFamily:
    """Janus's image span: ``G x G`` codes of its VQ, scored by ``generation_head``.

    Args:
        model: a ``JanusForConditionalGeneration``.
        processor: its ``JanusProcessor`` (builds the prompts).
    """

    name = "janus"
    token_ids = None  # codes are LM ids code_offset + code of the wrapper `_JanusImageLM`

    def __init__(self, model: Any, processor: Any):
        self.model = model
        self.processor = processor
        vq = model.model.vqmodel
        self.height, self.width = (int(x) for x in vq.quantize.quant_state_dims)
        self.codebook_size = self.num_codes = int(vq.config.num_embeddings)
        self.code_offset = int(model.get_input_embeddings().num_embeddings)
        tok = processor.tokenizer
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.bos_token_id = tok.bos_token_id
        self.boi_token_id = tok.convert_tokens_to_ids(tok.boi_token)
        self.lm = _JanusImageLM(model, self.code_offset)

    @property
    def image_tokens(self) -> tuple[int, int]:
        return self.height, self.width

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt as ``JanusProcessor(generation_mode="image")`` builds them."""
        out = self.processor(text=list(prompts), generation_mode="image")
        return [list(map(int, row)) for row in out["input_ids"]]

    encode_prompts = Emu3Family.encode_prompts

    def unconditional(
        self, ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Janus's unconditional rows: every prompt token but BOS and BOI replaced by pad (attended)."""
        keep = (ids == self.bos_token_id) | (ids == self.boi_token_id) | (mask == 0)
        return ids.masked_fill(~keep, self.pad_token_id), mask.clone()

    position_constraint = None

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> list[Any]:
        """PIL images through the model's own ``decode_image_tokens``."""
        from diffusers.image_processor import VaeImageProcessor

        device = next(self.model.parameters()).device
        pixels = self.model.decode_image_tokens(codes.to(device)).permute(0, 3, 1, 2)
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
    image, as its processor takes it) and ``JanusForConditionalGeneration``
    (the image size is its VQ's). Anything else is a ``ValueError`` that
    says why and what is supported.
    """
    from decodekit.pipelines.ar_image import ARImageConfig, ARImagePipeline

    kind = getattr(getattr(model, "config", None), "model_type", None)
    cls_name = type(model).__name__
    if SUPPORTED.get(kind) != cls_name:
        why = _CANNOT.get(kind, f"{cls_name} (model_type {kind!r}) is not an image-token model "
                          "the pipeline knows")  # fmt: skip
        raise ValueError(
            f"ARImagePipeline cannot run {cls_name}: {why}. Supported transformers classes: "
            f"{', '.join(SUPPORTED.values())}; other models load as an ar-image folder "
            "(ar_image.json, lm/, vq/, tokenizer/) or through `decodekit convert-llamagen`."
        )
    if kind == "janus":
        family = JanusFamily(model, processor)
    elif image_area is None:
        raise ValueError("Emu3 needs image_area (pixels), as its processor takes it.")
    else:
        family = Emu3Family(model, processor, image_area=image_area)
    config = ARImageConfig(
        image_tokens=family.image_tokens,
        code_offset=family.code_offset,
        codebook_size=family.num_codes,
        boi_token_id=family.boi_token_id,
        pad_token_id=family.pad_token_id,
        max_prompt_tokens=max_prompt_tokens,
        null_prompt=null_prompt,
    )
    return ARImagePipeline(family.lm, None, processor.tokenizer, config, family=family, **kwargs)
