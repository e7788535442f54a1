"""``decodekit convert-llamagen``: LlamaGen's class-conditional GPT and VQ tokenizer as an ar-image folder.

LlamaGen (FoundationVision/LlamaGen) releases ``.pt`` files holding
``{"model": state_dict}`` and no config. The GPT's shape is read off its weights
(width, layers, codebook, classes, FFN width; K/V heads from ``wqkv`` once the
head count is known); the head count and the image grid are not in the weights:
the head count follows LlamaGen's presets from the width (GPT-B 768/12, GPT-L
1024/16, GPT-XL 1280/20, GPT-XXL 1536/24, GPT-XXXL 2560/40; ``--num-heads``
otherwise), the grid from ``--image-size`` / ``--downsample`` (256 / 16 -> 16 x 16).
The GPT loads, under its own parameter names, into
`decodekit.pipelines.llamagen.LlamaGenForCausalLM` (2-D RoPE written here).

The VQ tokenizer maps exactly onto a diffusers ``VQModel`` (down blocks
``DownEncoderBlock2D`` with ``AttnDownEncoderBlock2D`` last, up blocks
``AttnUpDecoderBlock2D`` first, attention in the mid blocks, GroupNorm 32 /
1e-6, asymmetric-padding downsampling, nearest upsampling): the 1x1 attention
convolutions become linear layers, and the codebook is written L2-normalised,
which is what LlamaGen's ``get_codebook_entry`` decodes from and gives the same
nearest codes for ``quantize`` (argmin of the distance to unit vectors does not
depend on the norm of ``z``).

Only class-conditional (c2i) checkpoints are handled: text-conditional (t2i)
ones condition on T5 features (``cls_embedding.cap_proj``) that this pipeline
does not compute, and are refused. So are unknown keys and shapes that do not
fit. Every file is read with ``torch.load(weights_only=True)``; the output is
safetensors, written to ``DST.partial`` and renamed at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from decodekit.pipelines.convert_llada import CheckpointError

__all__ = ["convert", "convert_cli", "gpt_config", "vq_config", "vq_state"]

HEADS = {768: 12, 1024: 16, 1280: 20, 1536: 24, 2560: 40}
"""LlamaGen's c2i presets: width -> heads (GPT-B, L, XL, XXL, XXXL)."""

_BLOCK = re.compile(
    r"layers\.(\d+)\.(attention\.wqkv|attention\.wo|feed_forward\.w[123]|attention_norm|ffn_norm)"
    r"\.weight"
)
_TOP = {
    "tok_embeddings.weight",
    "cls_embedding.embedding_table.weight",
    "norm.weight",
    "output.weight",
}


def _load(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file; give LlamaGen's {what} checkpoint (.pt).")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal is reported the same way
        raise CheckpointError(
            f"{path} does not load with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); only plain tensor checkpoints are read."
        ) from None
    for key in ("model", "ema", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(
            f"{path} holds no state dict ({{'model': {{name: tensor}}}} as LlamaGen saves them)."
        )
    # runtime K/V caches and torch.compile prefixes are not weights
    return {k.removeprefix("_orig_mod."): v for k, v in data.items() if ".kv_cache." not in k}


def gpt_config(
    state: dict[str, torch.Tensor],
    *,
    num_heads: int | None = None,
    image_size: int = 256,
    downsample: int = 16,
    rope_theta: float = 10000.0,
) -> dict[str, Any]:
    """The `LlamaGenConfig` of a c2i GPT state dict; refuses t2i and unknown keys."""
    if any(
        k.startswith("cls_embedding.cap_proj") or k == "cls_embedding.uncond_embedding"
        for k in state
    ):
        raise CheckpointError(
            "this is a text-conditional (t2i) LlamaGen checkpoint (T5 caption features through "
            "cls_embedding.cap_proj); only class-conditional (c2i) checkpoints are supported."
        )
    missing = sorted(_TOP - set(state))
    if missing:
        raise CheckpointError(f"not a LlamaGen c2i GPT: it lacks {', '.join(missing)}.")
    layers = sorted({int(m.group(1)) for k in state if (m := _BLOCK.fullmatch(k))})
    unknown = sorted(k for k in state if k not in _TOP and not _BLOCK.fullmatch(k))
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise CheckpointError(
            f"unknown keys in the GPT checkpoint: {', '.join(unknown[:3])}{more}; "
            "convert-llamagen reads LlamaGen's c2i GPT (autoregressive/models/gpt.py) only."
        )
    codebook, dim = state["tok_embeddings.weight"].shape
    classes = state["cls_embedding.embedding_table.weight"].shape[0] - 1
    heads = num_heads or HEADS.get(dim)
    if heads is None:
        raise CheckpointError(
            f"width {dim} is none of LlamaGen's presets {sorted(HEADS)}; give --num-heads."
        )
    if dim % heads:
        raise CheckpointError(f"width {dim} is not divisible by {heads} heads.")
    head_dim = dim // heads
    if head_dim % 4:
        raise CheckpointError(
            f"{heads} heads give a head dimension of {head_dim}; LlamaGen's 2-D RoPE needs a "
            "multiple of 4 (is --num-heads right?)."
        )
    if layers != list(range(len(layers))) or not layers:
        raise CheckpointError(f"the GPT's layers are not 0..n-1: {layers[:5]}...")
    qkv = state["layers.0.attention.wqkv.weight"].shape[0]
    kv_heads, rest = divmod(qkv - dim, 2 * head_dim)
    if rest or kv_heads < 1 or heads % kv_heads:
        raise CheckpointError(
            f"wqkv has {qkv} rows, which no K/V head count fits for {heads} heads of {head_dim}; "
            "is --num-heads right?"
        )
    if image_size % downsample:
        raise CheckpointError(
            f"--image-size {image_size} is not a multiple of --downsample {downsample}."
        )
    if classes < 1:
        raise CheckpointError(
            "the class embedding has no null class row (class_dropout_prob 0); "
            "classifier-free guidance and this converter need it."
        )
    return {
        "model_type": "llamagen",
        "architectures": ["LlamaGenForCausalLM"],
        "hidden_size": dim,
        "num_hidden_layers": len(layers),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": state["layers.0.feed_forward.w1.weight"].shape[0],
        "codebook_size": codebook,
        "num_classes": classes,
        "grid_size": image_size // downsample,
        "cls_token_num": 1,
        "rope_theta": rope_theta,
        "rms_norm_eps": 1e-5,
    }


def vq_config(state: dict[str, torch.Tensor], *, image_size: int = 256) -> dict[str, Any]:
    """The diffusers ``VQModel`` config of a LlamaGen VQ state dict."""
    need = [
        "encoder.conv_in.weight",
        "decoder.conv_in.weight",
        "quantize.embedding.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
    ]
    missing = [k for k in need if k not in state]
    if missing:
        raise CheckpointError(
            f"not a LlamaGen VQ tokenizer (tokenizer/tokenizer_image/vq_model.py): it lacks "
            f"{', '.join(missing)}."
        )
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = len({k.split(".")[2] for k in state if k.startswith("encoder.conv_blocks.")})
    channels = [
        state[f"encoder.conv_blocks.{i}.res.1.conv2.weight"].shape[0] for i in range(levels)
    ]
    codes, embed_dim = state["quantize.embedding.weight"].shape
    z = state["quant_conv.weight"].shape[1]
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * (levels - 1) + ["AttnDownEncoderBlock2D"],
        "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * (levels - 1),
        "block_out_channels": channels,
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": z,
        "sample_size": image_size,
        "num_vq_embeddings": codes,
        "norm_num_groups": 32,
        "vq_embed_dim": embed_dim,
        "scaling_factor": 1.0,
        "norm_type": "group",
        "mid_block_add_attention": True,
        "lookup_from_codebook": False,
        "force_upcast": False,
        "_ch": ch,
    }


_RES = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _vq_key(key: str) -> str | None:
    """The diffusers name of a LlamaGen VQ key (None: not a weight, dropped)."""
    if key == "quantize.codebook_used":
        return None
    if key.startswith(("quant_conv.", "post_quant_conv.", "quantize.embedding.")):
        return key
    part, rest = key.split(".", 1)
    if part not in ("encoder", "decoder"):
        return "?"
    blocks = "down_blocks" if part == "encoder" else "up_blocks"
    sampler = "downsamplers" if part == "encoder" else "upsamplers"
    top = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}
    m = re.fullmatch(r"(conv_in|conv_out|norm_out)\.(weight|bias)", rest)
    if m:
        return f"{part}.{top[m.group(1)]}.{m.group(2)}"
    m = re.fullmatch(r"mid\.([012])\.(\w+)\.(weight|bias)", rest)
    if m:
        i, mod, wb = int(m.group(1)), m.group(2), m.group(3)
        if i == 1 and mod in _ATTN:
            return f"{part}.mid_block.attentions.0.{_ATTN[mod]}.{wb}"
        if i != 1 and mod in _RES:
            return f"{part}.mid_block.resnets.{i // 2}.{_RES[mod]}.{wb}"
        return "?"
    m = re.fullmatch(r"conv_blocks\.(\d+)\.(res|attn)\.(\d+)\.(\w+)\.(weight|bias)", rest)
    if m:
        level, kind, j, mod, wb = m.groups()
        table = _RES if kind == "res" else _ATTN
        if mod not in table:
            return "?"
        group = "resnets" if kind == "res" else "attentions"
        return f"{part}.{blocks}.{level}.{group}.{j}.{table[mod]}.{wb}"
    m = re.fullmatch(r"conv_blocks\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)", rest)
    if m:
        return f"{part}.{blocks}.{m.group(1)}.{sampler}.0.conv.{m.group(3)}"
    return "?"


def vq_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LlamaGen VQ weights under diffusers ``VQModel`` names (float32, codebook L2-normalised)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        name = _vq_key(key)
        if name is None:
            continue
        if name == "?":
            unknown.append(key)
            continue
        value = value.float()
        if (
            ".attentions." in name
            and not name.endswith("group_norm.weight")
            and not name.endswith("group_norm.bias")
            and value.dim() == 4
        ):
            value = value[:, :, 0, 0]  # 1x1 convolution -> linear
        if name == "quantize.embedding.weight":
            value = torch.nn.functional.normalize(value, p=2, dim=-1)
        out[name] = value.contiguous()
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise CheckpointError(
            f"unknown keys in the VQ checkpoint: {', '.join(unknown[:3])}{more}; "
            "convert-llamagen reads LlamaGen's VQ (tokenizer/tokenizer_image/vq_model.py) only."
        )
    return out


def _fill(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``model`` strictly, with messages that name the keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise CheckpointError(
            f"the {what} checkpoint does not fit the inferred architecture: missing "
            f"{missing[:3]}, unexpected {extra[:3]}; is it an unmodified LlamaGen checkpoint?"
        )
    for k, v in state.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{what} weight {k} has shape {tuple(v.shape)}, the inferred architecture wants "
                f"{tuple(own[k].shape)}; check --num-heads / the checkpoint."
            )
    model.load_state_dict(state, strict=True)


def convert(
    src_gpt: str | os.PathLike,
    src_vq: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    num_heads: int | None = None,
    image_size: int = 256,
    downsample: int = 16,
) -> Path:
    """Write LlamaGen's c2i GPT and VQ as an ar-image folder ``dst`` (ar_image.json, lm/, vq/).

    ``dst`` must not exist; everything is written to ``dst.partial`` and renamed at the end.
    """
    from decodekit.pipelines.ar_image import CONFIG_NAME, ARImageConfig
    from decodekit.pipelines.llamagen import LlamaGenConfig, LlamaGenForCausalLM
    from diffusers import VQModel

    src_gpt, src_vq, dst = (Path(p).expanduser() for p in (src_gpt, src_vq, dst))
    if dst.exists():
        raise CheckpointError(f"{dst} exists; give a new folder to write the converted model to.")
    partial = dst.with_name(dst.name + ".partial")
    if partial.exists():
        raise CheckpointError(
            f"{partial} exists, left by a conversion that was killed; remove it and run again."
        )
    gpt = _load(src_gpt, "GPT")
    config = gpt_config(gpt, num_heads=num_heads, image_size=image_size, downsample=downsample)
    vq_raw = _load(src_vq, "VQ tokenizer")
    vcfg = vq_config(vq_raw, image_size=image_size)
    ch = vcfg.pop("_ch")
    if ch % 32 or any(c % 32 for c in vcfg["block_out_channels"]):
        raise CheckpointError(
            f"VQ channels {vcfg['block_out_channels']} are not multiples of 32 (GroupNorm 32)."
        )
    factor = 2 ** (len(vcfg["block_out_channels"]) - 1)
    if factor != downsample:
        raise CheckpointError(
            f"the VQ downsamples by {factor}, not --downsample {downsample}; give the VQ that "
            "matches the GPT (VQ-16 for the released c2i GPTs)."
        )
    if vq_raw["quantize.embedding.weight"].shape[0] != config["codebook_size"]:
        raise CheckpointError(
            f"the VQ has {vq_raw['quantize.embedding.weight'].shape[0]} codes, the GPT "
            f"{config['codebook_size']}; give the tokenizer the GPT was trained on."
        )
    lm = LlamaGenForCausalLM(LlamaGenConfig(**config))
    _fill(lm, {k: v.to(torch.float32) for k, v in gpt.items()}, "GPT")
    vq = VQModel(**vcfg)
    _fill(vq, vq_state(vq_raw), "VQ")
    k, c = config["codebook_size"], config["num_classes"]
    g = config["grid_size"]
    layout = ARImageConfig(
        image_tokens=(g, g),
        code_offset=0,
        codebook_size=k,
        boi_token_id=k + c,  # unused for class prompts: the class token starts the image
        pad_token_id=k + c,
        max_prompt_tokens=1,
        num_classes=c,
        class_token_offset=k,
    )
    partial.mkdir(parents=True)
    try:
        layout.to_json(partial / CONFIG_NAME)
        lm.save_pretrained(partial / "lm", safe_serialization=True)
        vq.save_pretrained(partial / "vq", safe_serialization=True)
        partial.rename(dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dst


def convert_cli(argv: list[str]) -> int:
    """``decodekit convert-llamagen SRC_GPT SRC_VQ DST``."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="decodekit convert-llamagen",
        description="Write LlamaGen's class-conditional GPT and its VQ tokenizer (.pt, "
        '{"model": state_dict}) as an ar-image folder (ar_image.json, lm/, vq/; safetensors).',
    )
    ap.add_argument("src_gpt", help="the c2i GPT checkpoint, e.g. c2i_L_256.pt")
    ap.add_argument("src_vq", help="the VQ tokenizer checkpoint, e.g. vq_ds16_c2i.pt")
    ap.add_argument("dst", help="new folder for the ar-image model")
    ap.add_argument(
        "--num-heads", type=int, help="attention heads (default: LlamaGen's preset for the width)"
    )
    ap.add_argument(
        "--image-size", type=int, default=256, help="image side in pixels (default 256)"
    )
    ap.add_argument(
        "--downsample", type=int, default=16, help="VQ downsampling factor (default 16)"
    )
    args = ap.parse_args(argv)
    out = convert(
        args.src_gpt,
        args.src_vq,
        args.dst,
        num_heads=args.num_heads,
        image_size=args.image_size,
        downsample=args.downsample,
    )
    cfg = json.loads((out / "lm" / "config.json").read_text())
    side = cfg["grid_size"]
    print(f"wrote {out} (LlamaGenForCausalLM, {cfg['num_classes']} classes, {side}x{side} codes)")
    return 0
