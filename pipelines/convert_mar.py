"""``decodekit convert-mar``: MAR's released checkpoints and its KL-16 VAE as a mar folder.

LTH14/mar releases ``mar_base`` / ``mar_large`` / ``mar_huge`` as
``checkpoint-last.pth``: ``{"model": ..., "model_ema": ...}`` (plus optimizer state
and arguments), both state dicts in the layout of its ``models/mar.py``, which
`decodekit.pipelines.mar.MARModel` shares. `convert_mar_model` takes the EMA
weights by default, as MAR's evaluation does (``weights="model"`` takes the raw
ones), reads the shape off the weights (widths, depths, classes, buffer, token
size, head width and depth) and takes what they do not say from the release:
256 px images, stride 16, patch 1, heads from the width (768: 12, 1024 and 1280:
16) unless given, 100 sampling steps. Every key must match: a missing, unknown
or misshapen weight is refused by name.

`convert_kl_vae` writes LTH14's ``vae/kl16.ckpt`` (``{"model": state_dict}`` of
an LDM ``AutoencoderKL``: embed_dim 16, ch 128, ch_mult (1, 1, 2, 2, 4), two
residual blocks, attention in the last encoder level and the middles) as a
diffusers ``AutoencoderKL`` folder with ``scaling_factor`` 0.2325 (MAR's latent
scale). The LDM names map onto diffusers' (``down.i.block.j`` to
``down_blocks.i.resnets.j``, ``nin_shortcut`` to ``conv_shortcut``, 1 x 1
attention convolutions to linears, the decoder's levels reversed); keys of the
training loss (``loss.*``) are dropped, anything else that does not map is
refused. Every file is read with ``torch.load(weights_only=True)``; the output is
written to ``DST.partial`` and renamed at the end.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from decodekit.pipelines.convert_llada import CheckpointError
from decodekit.pipelines.convert_var import _count, _writing

__all__ = [
    "MAR_LATENT_SCALE",
    "convert_kl_vae",
    "convert_mar_cli",
    "convert_mar_model",
    "kl_vae_to_diffusers",
    "mar_config",
]

MAR_LATENT_SCALE = 0.2325
"""MAR multiplies the KL-16 latents by this before modelling them (``main_mar.py``, ``engine_mar.py``)."""

HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16}
"""Heads of ``mar_base`` (768), ``mar_large`` (1024) and ``mar_huge`` (1280)."""

_MAR_NEED = (
    "class_emb.weight",
    "z_proj.weight",
    "encoder_pos_embed_learned",
    "decoder_embed.weight",
    "diffusion_pos_embed_learned",
    "diffloss.net.input_proj.weight",
)


def _load(path: Path, what: str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file; give MAR's {what} checkpoint.")
    import argparse

    try:
        # MAR's save_model stores its argparse.Namespace beside the weights: a plain attribute bag
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal is reported the same way
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"{path} does not load with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{first}); only tensor checkpoints are read."
        ) from None


def _state(data: Any, key: str, path: Path) -> dict[str, torch.Tensor]:
    """``data[key]`` as a ``{name: tensor}`` dict, or a clear refusal."""
    state = data.get(key) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not state:
        have = sorted(k for k in data if isinstance(k, str)) if isinstance(data, dict) else []
        raise CheckpointError(
            f"{path} has no {key!r} state dict (keys: {have[:8]}); MAR's checkpoints hold "
            "'model' and 'model_ema', its VAE 'model'."
        )
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}[{key!r}] is not a flat {{name: tensor}} state dict.")
    return state


# ---------------------------------------------------------------------------------------- MAR
def mar_config(
    state: dict[str, torch.Tensor],
    *,
    img_size: int = 256,
    vae_stride: int = 16,
    patch_size: int = 1,
    num_heads: int | None = None,
    num_sampling_steps: str = "100",
) -> dict[str, Any]:
    """The `MARConfig` fields of a MAR state dict (see the module docstring for the defaults)."""
    missing = [k for k in _MAR_NEED if k not in state]
    if missing:
        raise CheckpointError(
            f"not a MAR state dict (models/mar.py): it lacks {', '.join(missing)}."
        )
    classes, width = state["class_emb.weight"].shape
    token_dim = state["z_proj.weight"].shape[1]
    seq_len = state["diffusion_pos_embed_learned"].shape[1]
    buffer = state["encoder_pos_embed_learned"].shape[1] - seq_len
    if token_dim % (patch_size * patch_size):
        raise CheckpointError(
            f"tokens of {token_dim} numbers do not split into {patch_size}x{patch_size} patches."
        )
    side = img_size // vae_stride // patch_size
    if side * side != seq_len:
        raise CheckpointError(
            f"the checkpoint has {seq_len} tokens; img_size {img_size}, vae_stride {vae_stride} and "
            f"patch_size {patch_size} give {side * side}: pass the ones it was trained with."
        )
    heads = num_heads or HEADS_BY_WIDTH.get(int(width))
    if heads is None:
        raise CheckpointError(
            f"the number of heads is not in the weights and width {width} is no released model's; "
            "give it (--num-heads)."
        )
    decoder_width = state["decoder_embed.weight"].shape[0]
    hidden = state.get("encoder_blocks.0.mlp.fc1.weight")
    return {
        "img_size": img_size,
        "vae_stride": vae_stride,
        "patch_size": patch_size,
        "vae_embed_dim": int(token_dim) // (patch_size * patch_size),
        "encoder_embed_dim": int(width),
        "encoder_depth": _count(state, r"encoder_blocks\.(\d+)\."),
        "encoder_num_heads": int(heads),
        "decoder_embed_dim": int(decoder_width),
        "decoder_depth": _count(state, r"decoder_blocks\.(\d+)\."),
        "decoder_num_heads": int(heads),
        "mlp_ratio": float(hidden.shape[0] / width) if hidden is not None else 4.0,
        "class_num": int(classes),
        "buffer_size": int(buffer),
        "diffloss_d": _count(state, r"diffloss\.net\.res_blocks\.(\d+)\."),
        "diffloss_w": int(state["diffloss.net.input_proj.weight"].shape[0]),
        "num_sampling_steps": str(num_sampling_steps),
    }


def load_mar_state(src_pth: str | os.PathLike, *, weights: str = "ema") -> dict[str, torch.Tensor]:
    """The ``model_ema`` (``weights="ema"``) or ``model`` state dict of a MAR checkpoint."""
    if weights not in ("ema", "model"):
        raise CheckpointError(f"weights must be 'ema' or 'model', got {weights!r}.")
    src = Path(src_pth).expanduser()
    data = _load(src, "model")
    return _state(data, "model_ema" if weights == "ema" else "model", src)


def convert_mar_model(
    src_pth: str | os.PathLike,
    dst_folder: str | os.PathLike,
    *,
    weights: str = "ema",
    **config: Any,
) -> Path:
    """Write a MAR checkpoint as a `MARModel` folder (``config.json``, ``model.safetensors``, float32).

    ``config`` takes `mar_config`'s keywords (``img_size``, ``num_heads`` ...).
    """
    from decodekit.pipelines.mar import MARConfig, MARModel

    src, dst = Path(src_pth).expanduser(), Path(dst_folder).expanduser()
    if dst.exists():
        raise CheckpointError(f"{dst} exists; give a new folder to write the converted model to.")
    state = load_mar_state(src, weights=weights)
    try:
        with torch.device("meta"):
            model = MARModel(MARConfig(**mar_config(state, **config)))
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{src}: {e}") from None
    with _writing(dst) as partial:
        model.save_pretrained(partial)
    return dst


# ---------------------------------------------------------------------------------------- KL VAE
def _take(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(
            f"the VAE checkpoint lacks {key}: not an LDM KL autoencoder of this shape."
        )
    return state.pop(key)


def _ldm_attention(src: str, dst: str, state: dict, out: dict) -> None:
    """An LDM ``AttnBlock`` (1 x 1 convolutions) as a diffusers ``Attention`` (linears)."""
    pairs = (
        ("norm", "group_norm"),
        ("q", "to_q"),
        ("k", "to_k"),
        ("v", "to_v"),
        ("proj_out", "to_out.0"),
    )
    for a, b in pairs:
        for p in ("weight", "bias"):
            w = _take(state, f"{src}.{a}.{p}")
            out[f"{dst}.{b}.{p}"] = w.flatten(1) if (p == "weight" and a != "norm") else w


def _ldm_resnet(src: str, dst: str, state: dict, out: dict) -> None:
    for name in ("norm1", "conv1", "norm2", "conv2", "nin_shortcut"):
        for p in ("weight", "bias"):
            key = f"{src}.{name}.{p}"
            if key in state:
                out[f"{dst}.{'conv_shortcut' if name == 'nin_shortcut' else name}.{p}"] = state.pop(
                    key
                )


def kl_vae_to_diffusers(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The diffusers ``AutoencoderKL`` config and state dict of an LDM KL autoencoder state dict."""
    need = ("encoder.conv_in.weight", "decoder.conv_in.weight", "encoder.conv_out.weight",
            "quant_conv.weight", "post_quant_conv.weight")  # fmt: skip
    missing = [k for k in need if k not in state]
    if missing:
        raise CheckpointError(f"not an LDM KL autoencoder: it lacks {', '.join(missing)}.")
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    levels = _count(state, r"encoder\.down\.(\d+)\.")
    blocks = _count(state, r"encoder\.down\.0\.block\.(\d+)\.")
    latent = state["post_quant_conv.weight"].shape[0]
    if levels < 1 or blocks < 1:
        raise CheckpointError("the encoder has no down.0.block.0: not an LDM KL autoencoder.")
    if (
        state["decoder.conv_in.weight"].shape[1] != latent
        or state["encoder.conv_out.weight"].shape[0] != 2 * latent
    ):
        raise CheckpointError(
            "only a variational autoencoder whose z_channels equal its embed_dim converts "
            f"(post_quant_conv {latent}, decoder.conv_in {state['decoder.conv_in.weight'].shape[1]}, "
            f"encoder.conv_out {state['encoder.conv_out.weight'].shape[0]})."
        )
    if any(re.match(r"decoder\.up\.\d+\.attn\.", k) for k in state):
        raise CheckpointError(
            "attention inside the decoder's levels is not supported (KL-16 has none)."
        )
    widths = [int(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels)]
    attn_down = [f"encoder.down.{i}.attn.0.q.weight" in state for i in range(levels)]
    out: dict[str, torch.Tensor] = {}
    state = dict(state)
    for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                 "quant_conv", "post_quant_conv"):  # fmt: skip
        for p in ("weight", "bias"):
            out[f"{name}.{p}"] = _take(state, f"{name}.{p}")
    for part in ("encoder", "decoder"):
        for p in ("weight", "bias"):
            out[f"{part}.conv_norm_out.{p}"] = _take(state, f"{part}.norm_out.{p}")
        _ldm_resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", state, out)
        _ldm_resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", state, out)
        _ldm_attention(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", state, out)
    for i in range(levels):
        for j in range(blocks):
            _ldm_resnet(
                f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", state, out
            )
            if attn_down[i]:
                _ldm_attention(
                    f"encoder.down.{i}.attn.{j}",
                    f"encoder.down_blocks.{i}.attentions.{j}",
                    state,
                    out,
                )
        if i < levels - 1:
            for p in ("weight", "bias"):
                out[f"encoder.down_blocks.{i}.downsamplers.0.conv.{p}"] = state.pop(
                    f"encoder.down.{i}.downsample.conv.{p}"
                )
        k = levels - 1 - i  # diffusers runs the decoder's levels lowest resolution first
        for j in range(blocks + 1):
            _ldm_resnet(
                f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}", state, out
            )
        if i > 0:
            for p in ("weight", "bias"):
                out[f"decoder.up_blocks.{k}.upsamplers.0.conv.{p}"] = state.pop(
                    f"decoder.up.{i}.upsample.conv.{p}"
                )
    if state:
        raise CheckpointError(
            f"weights that do not map onto diffusers' AutoencoderKL: {sorted(state)[:6]}."
        )
    config = {
        "in_channels": int(out["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(out["decoder.conv_out.weight"].shape[0]),
        "down_block_types": [
            "AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn_down
        ],
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": widths,
        "layers_per_block": blocks,
        "act_fn": "silu",
        "latent_channels": int(latent),
        "norm_num_groups": 32,
        "sample_size": 256,
        "scaling_factor": MAR_LATENT_SCALE,
        "mid_block_add_attention": True,
    }
    return config, out


def convert_kl_vae(src_ckpt: str | os.PathLike, dst_folder: str | os.PathLike) -> Path:
    """Write LTH14's ``kl16.ckpt`` (an LDM ``AutoencoderKL``) as a diffusers ``AutoencoderKL`` folder."""
    from diffusers import AutoencoderKL

    src, dst = Path(src_ckpt).expanduser(), Path(dst_folder).expanduser()
    if dst.exists():
        raise CheckpointError(f"{dst} exists; give a new folder to write the converted model to.")
    config, state = kl_vae_to_diffusers(_state(_load(src, "VAE"), "model", src))
    try:
        with torch.device("meta"):
            vae = AutoencoderKL(**config)
        vae.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{src}: {e}") from None
    with _writing(dst) as partial:
        vae.save_pretrained(partial)
    return dst


def convert_mar_cli(argv: list[str]) -> int:
    """``decodekit convert-mar [--mar PTH] [--vae CKPT] --out DIR``."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="decodekit convert-mar",
        description="Write MAR's released checkpoints as a mar folder: the model under DIR/model "
        "(config.json, model.safetensors), the KL-16 VAE under DIR/vae (a diffusers AutoencoderKL), "
        "and DIR/mar.json with --class-names.",
    )
    ap.add_argument("--mar", help="a MAR checkpoint, e.g. mar_base/checkpoint-last.pth")
    ap.add_argument("--vae", help="the KL-16 VAE checkpoint, e.g. vae/kl16.ckpt")
    ap.add_argument("--out", required=True, help="new folder to write")
    ap.add_argument("--weights", choices=("ema", "model"), default="ema",
                    help="the EMA weights (default, as MAR samples) or the raw ones")  # fmt: skip
    ap.add_argument("--num-heads", type=int, help="attention heads (default: the released model's)")
    ap.add_argument("--img-size", type=int, default=256, help="image side (default 256)")
    ap.add_argument("--vae-stride", type=int, default=16, help="pixels per latent (default 16)")
    ap.add_argument("--patch-size", type=int, default=1, help="latents per token side (default 1)")
    ap.add_argument("--num-sampling-steps", default="100", help="head DDPM steps (default 100)")
    ap.add_argument("--class-names", help="a JSON list of the class names, one per class id")
    args = ap.parse_args(argv)
    if not args.mar and not args.vae:
        ap.error("give --mar, --vae or both")
    names = None
    if args.class_names:
        names = json.loads(Path(args.class_names).read_text())
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CheckpointError(f"{args.class_names} must hold a JSON list of class names.")
    out = Path(args.out).expanduser()
    with _writing(out) as partial:
        if args.mar:
            convert_mar_model(
                args.mar,
                partial / "model",
                weights=args.weights,
                img_size=args.img_size,
                vae_stride=args.vae_stride,
                patch_size=args.patch_size,
                num_heads=args.num_heads,
                num_sampling_steps=args.num_sampling_steps,
            )
        if args.vae:
            convert_kl_vae(args.vae, partial / "vae")
        if args.mar and args.vae:
            _check_pair(partial, names)
        if names is not None:
            (partial / "mar.json").write_text(json.dumps({"class_names": names}, indent=1) + "\n")
    parts = [("model/: MAR " + args.weights, args.mar), ("vae/: KL VAE", args.vae)]
    print(f"wrote {out} ({', '.join(p for p, given in parts if given)})")
    return 0


def _check_pair(folder: Path, names: list[str] | None) -> None:
    """Refuse a model whose tokens are not the VAE's latents, or class names of another count."""
    model = json.loads((folder / "model" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    stride = 2 ** (len(vae["block_out_channels"]) - 1)
    wrong = []
    if model["vae_embed_dim"] != vae["latent_channels"]:
        wrong.append(
            f"vae_embed_dim {model['vae_embed_dim']} vs latent_channels {vae['latent_channels']}"
        )
    if model["vae_stride"] != stride:
        wrong.append(f"vae_stride {model['vae_stride']} vs the VAE's stride {stride}")
    if names is not None and len(names) != model["class_num"]:
        wrong.append(f"{len(names)} class names for {model['class_num']} classes")
    if wrong:
        raise CheckpointError(
            "the MAR model and the VAE do not belong together: " + ", ".join(wrong) + "."
        )
