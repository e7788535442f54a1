"""``decodekit convert-var``: VAR's released checkpoints as a var folder (safetensors).

FoundationVision/VAR releases ``vae_ch160v4096z32.pth`` (the multi-scale VQ-VAE) and
``var_d16.pth`` .. ``var_d30.pth`` (the transformers) as flat state dicts without a
config. `convert_var_vae` reads the VQ-VAE's shape off its weights (codebook size and
``Cvae`` from ``quantize.embedding``, ``ch`` / ``ch_mult`` / residual blocks from the
encoder, the ``quant_conv`` kernel, and the ``phi`` sharing from the ``quant_resi`` keys);
what the weights do not say has VAR's release values unless given: the scale sides
``v_patch_nums`` (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), ``quant_resi`` 0.5 and squared-distance
codes (``using_znorm`` off). The training statistic ``quantize.ema_vocab_hit_SV`` is
dropped; any other unknown key, missing key or wrong shape is refused.
`convert_var_transformer` reads a transformer's depth, width, classes, codebook size,
``Cvae``, MLP ratio, ``shared_aln`` and ``attn_l2_norm`` (and then its heads) off its
weights, checks the scale sides against its position table, drops VAR's three buffers
and writes a `VARTransformer` folder. Every file is read with
``torch.load(weights_only=True)``; the output is written to ``DST.partial`` and renamed
at the end.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from decodekit.pipelines.convert_llada import CheckpointError

__all__ = [
    "convert_var_cli",
    "convert_var_transformer",
    "convert_var_vae",
    "vae_config",
    "var_transformer_config",
]

_VAE_NEED = (
    "encoder.conv_in.weight",
    "decoder.conv_in.weight",
    "quantize.embedding.weight",
    "quant_conv.weight",
    "post_quant_conv.weight",
)
_VAE_DROPPED = ("quantize.ema_vocab_hit_SV",)  # a training statistic, not a weight
_TRANSFORMER_KEYS = ("word_embed.weight", "class_emb.weight", "head.weight", "pos_start")


def _load_state(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` checkpoint, read with ``weights_only=True``."""
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file; give VAR's {what} checkpoint (.pth).")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal is reported the same way
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"{path} does not load with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{first}); only plain tensor checkpoints are read."
        ) from None
    if (
        not isinstance(data, dict)
        or not data
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items())
    ):
        raise CheckpointError(
            f"{path} holds no flat state dict ({{name: tensor}}, as VAR releases its {what})."
        )
    return {k.removeprefix("_orig_mod."): v for k, v in data.items()}


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    """How many consecutive indices ``0, 1, ...`` the regex ``pattern`` (one group) finds."""
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    n = 0
    while n in found:
        n += 1
    return n


def vae_config(
    state: dict[str, torch.Tensor],
    *,
    v_patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    quant_resi: float = 0.5,
    using_znorm: bool = False,
) -> dict[str, Any]:
    """The `MultiScaleVQConfig` fields of a VAR VQ-VAE state dict."""
    if any(k in state for k in _TRANSFORMER_KEYS):
        raise CheckpointError(
            "this is a VAR transformer checkpoint (var_d*.pth: word_embed, blocks, head), not "
            "the VQ-VAE; give it as --var and vae_ch160v4096z32.pth as --vae."
        )
    missing = [k for k in _VAE_NEED if k not in state]
    if missing:
        raise CheckpointError(f"not a VAR VQ-VAE (models/vqvae.py): it lacks {', '.join(missing)}.")
    for key in _VAE_NEED:
        want = 2 if key == "quantize.embedding.weight" else 4
        if state[key].dim() != want:
            raise CheckpointError(
                f"{key} has shape {tuple(state[key].shape)}; a VAR VQ-VAE's is {want}-dimensional."
            )
    vocab, cvae = state["quantize.embedding.weight"].shape
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = _count(state, r"encoder\.down\.(\d+)\.")
    blocks = _count(state, r"encoder\.down\.0\.block\.(\d+)\.")
    if levels < 1 or blocks < 1:
        raise CheckpointError("the encoder has no down.0.block.0: not a VAR VQ-VAE encoder.")
    ch_mult = []
    for i in range(levels):
        key = f"encoder.down.{i}.block.0.conv1.weight"
        if key not in state:
            raise CheckpointError(f"the VQ-VAE checkpoint lacks {key}.")
        width = state[key].shape[0]
        if width % ch:
            raise CheckpointError(f"{key} has {width} channels, not a multiple of ch = {ch}.")
        ch_mult.append(width // ch)
    ks = state["quant_conv.weight"].shape[-1]
    phi = sorted(k for k in state if k.startswith("quantize.quant_resi."))
    if not phi:  # |quant_resi| < 1e-6: identities without weights
        share, counts, quant_resi = 4, 0, 0.0
    elif all(k.startswith("quantize.quant_resi.qresi_ls.") for k in phi):
        share, counts = _count(state, r"quantize\.quant_resi\.qresi_ls\.(\d+)\."), 0
    elif all(k.startswith("quantize.quant_resi.qresi.") for k in phi):
        share, counts = 1, 0
    elif all(re.match(r"quantize\.quant_resi\.\d+\.", k) for k in phi):
        share, counts = 0, _count(state, r"quantize\.quant_resi\.(\d+)\.")
        if counts == len(v_patch_nums):
            counts = 0
    else:
        raise CheckpointError(f"unrecognised quant_resi layout in the VQ-VAE: {phi[:3]}.")
    if phi and abs(quant_resi) <= 1e-6:
        raise CheckpointError(
            "the checkpoint has phi convolutions (quantize.quant_resi.*), which a quant_resi of "
            f"{quant_resi} turns off; give the ratio it was trained with (VAR's release: 0.5)."
        )
    return {
        "vocab_size": int(vocab),
        "z_channels": int(cvae),
        "ch": int(ch),
        "ch_mult": tuple(ch_mult),
        "num_res_blocks": blocks,
        "using_znorm": bool(using_znorm),
        "quant_conv_ks": int(ks),
        "quant_resi": float(quant_resi),
        "share_quant_resi": share,
        "default_qresi_counts": counts,
        "v_patch_nums": tuple(v_patch_nums),
    }


@contextmanager
def _writing(dst: Path) -> Iterator[Path]:
    """Yield ``dst.partial`` to write into; renamed to ``dst`` on success, removed on failure."""
    partial = dst.with_name(dst.name + ".partial")
    for path, why in (
        (dst, "give a new folder to write the converted model to"),
        (partial, "left by a conversion that was killed; remove it and run again"),
    ):
        if path.exists():
            raise CheckpointError(f"{path} exists, {why}.")
    partial.mkdir(parents=True)
    try:
        yield partial
        partial.rename(dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def convert_var_vae(
    src_pth: str | os.PathLike,
    dst_folder: str | os.PathLike,
    *,
    v_patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    quant_resi: float = 0.5,
    using_znorm: bool = False,
) -> Path:
    """Write VAR's VQ-VAE checkpoint as a `MultiScaleVQVAE` folder (config.json, model.safetensors).

    ``dst_folder`` must not exist; it is written as ``dst_folder.partial`` and renamed.
    """
    from decodekit.errors import ConfigError
    from decodekit.pipelines.var_vq import MultiScaleVQConfig, MultiScaleVQVAE

    src, dst = Path(src_pth).expanduser(), Path(dst_folder).expanduser()
    if dst.exists():
        raise CheckpointError(f"{dst} exists; give a new folder to write the converted model to.")
    state = _load_state(src, "VQ-VAE")
    fields = vae_config(
        state, v_patch_nums=v_patch_nums, quant_resi=quant_resi, using_znorm=using_znorm
    )
    try:
        config = MultiScaleVQConfig(**fields)
    except ConfigError as e:
        raise CheckpointError(f"{src}: the VQ-VAE's shape is not supported: {e}") from None
    model = MultiScaleVQVAE(config)
    weights = {k: v for k, v in state.items() if k not in _VAE_DROPPED}
    model.load_weights({k: v.float() for k, v in weights.items()}, source=str(src))
    with _writing(dst) as partial:
        model.save_pretrained(partial)
    return dst


RELEASE_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
"""The scale sides of VAR's released models."""


def var_transformer_config(
    state: dict[str, torch.Tensor],
    *,
    patch_nums: tuple[int, ...] = RELEASE_PATCH_NUMS,
    num_heads: int | None = None,
) -> dict[str, Any]:
    """The `VARTransformer` arguments of a VAR transformer state dict (``var_d*.pth``).

    Depth, width, classes, codebook size, ``Cvae``, MLP ratio, ``shared_aln`` and
    ``attn_l2_norm`` are read off the weights; the heads too when ``attn_l2_norm``
    is on (its per-head scale), else ``num_heads`` or VAR's rule (``heads = depth``).
    ``patch_nums`` must agree with the position table and the level embedding.
    """
    if "quantize.embedding.weight" in state:
        raise CheckpointError(
            "this is the VAR VQ-VAE checkpoint (vae_ch160v4096z32.pth), not a transformer; give "
            "it as --vae and var_d*.pth as --var."
        )
    missing = [k for k in (*_TRANSFORMER_KEYS, "pos_1LC", "lvl_embed.weight") if k not in state]
    depth = _count(state, r"blocks\.(\d+)\.")
    if missing or depth < 1:
        raise CheckpointError(
            "not a VAR transformer (models/var.py): it lacks "
            + (", ".join(missing) if missing else "blocks.0")
            + "."
        )
    C, cvae = state["word_embed.weight"].shape
    hidden = state["blocks.0.ffn.fc1.weight"].shape[0] if "blocks.0.ffn.fc1.weight" in state else 0
    scale_mul = state.get("blocks.0.attn.scale_mul_1H11")
    heads = int(scale_mul.shape[1]) if scale_mul is not None else (num_heads or depth)
    L, levels = state["pos_1LC"].shape[1], state["lvl_embed.weight"].shape[0]
    if sum(p * p for p in patch_nums) != L or len(patch_nums) != levels:
        raise CheckpointError(
            f"the checkpoint has {levels} scales and {L} positions; patch_nums {tuple(patch_nums)} "
            f"give {len(patch_nums)} and {sum(p * p for p in patch_nums)}: pass the sides it was "
            "trained with (--patch-nums)."
        )
    return {
        "num_classes": int(state["class_emb.weight"].shape[0]) - 1,
        "depth": depth,
        "embed_dim": int(C),
        "num_heads": heads,
        "mlp_ratio": hidden / C if hidden else 4.0,
        "shared_aln": "blocks.0.ada_gss" in state,
        "attn_l2_norm": scale_mul is not None,
        "patch_nums": tuple(patch_nums),
        "vocab_size": int(state["head.weight"].shape[0]),
        "vae_embed_dim": int(cvae),
    }


def convert_var_transformer(
    src_pth: str | os.PathLike,
    dst_folder: str | os.PathLike,
    *,
    patch_nums: tuple[int, ...] = RELEASE_PATCH_NUMS,
    num_heads: int | None = None,
) -> Path:
    """Write VAR's transformer checkpoint (``var_d16.pth`` ..) as a `VARTransformer` folder.

    The folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (float32);
    VAR's buffers (``lvl_1L``, ``attn_bias_for_masking``, ``zero_k_bias``) are dropped,
    anything else that does not fit is refused by name. ``dst_folder`` must not exist;
    it is written as ``dst_folder.partial`` and renamed.
    """
    from decodekit.pipelines.var import VARTransformer

    src, dst = Path(src_pth).expanduser(), Path(dst_folder).expanduser()
    if dst.exists():
        raise CheckpointError(f"{dst} exists; give a new folder to write the converted model to.")
    state = _load_state(src, "transformer")
    config = var_transformer_config(state, patch_nums=patch_nums, num_heads=num_heads)
    try:
        with torch.device("meta"):
            model = VARTransformer(**config)
        model = model.to_empty(device="cpu")
        model.load_official_state_dict({k: v.float() for k, v in state.items()})
    except ValueError as e:
        raise CheckpointError(f"{src}: {e}") from None
    with _writing(dst) as partial:
        model.save_pretrained(partial)
    return dst


def _patch_nums(text: str) -> tuple[int, ...]:
    import argparse

    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 1,2,3,4,5,6,8,10,13,16; got {text!r}"
        ) from None


def convert_var_cli(argv: list[str]) -> int:
    """``decodekit convert-var [--vae PTH] [--var PTH] --out DIR``."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="decodekit convert-var",
        description="Write VAR's released checkpoints (flat .pth state dicts) as a var folder: "
        "the VQ-VAE under DIR/vq (config.json, model.safetensors), the transformer under "
        "DIR/transformer (config.json, diffusion_pytorch_model.safetensors).",
    )
    ap.add_argument("--vae", help="the VQ-VAE checkpoint, e.g. vae_ch160v4096z32.pth")
    ap.add_argument("--var", help="the transformer checkpoint, e.g. var_d16.pth")
    ap.add_argument("--out", required=True, help="new folder to write")
    ap.add_argument(
        "--patch-nums",
        type=_patch_nums,
        default=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        help="side of each scale's token map (default 1,2,3,4,5,6,8,10,13,16)",
    )
    ap.add_argument(
        "--quant-resi", type=float, default=0.5, help="the VQ-VAE's phi ratio (default 0.5)"
    )
    ap.add_argument(
        "--znorm", action="store_true", help="the VQ-VAE chooses codes by cosine (using_znorm)"
    )
    args = ap.parse_args(argv)
    if not args.vae and not args.var:
        ap.error("give --vae, --var or both")
    out = Path(args.out).expanduser()
    with _writing(out) as partial:
        if args.vae:
            convert_var_vae(
                args.vae,
                partial / "vq",
                v_patch_nums=args.patch_nums,
                quant_resi=args.quant_resi,
                using_znorm=args.znorm,
            )
        if args.var:
            convert_var_transformer(args.var, partial / "transformer", patch_nums=args.patch_nums)
        if args.vae and args.var:
            _check_pair(partial)
    parts = [("vq/: VAR VQ-VAE", args.vae), ("transformer/: VAR transformer", args.var)]
    print(f"wrote {out} ({', '.join(p for p, given in parts if given)})")
    return 0


def _check_pair(folder: Path) -> None:
    """Refuse a transformer whose codebook size or ``Cvae`` is not the VQ-VAE's."""
    import json

    vq = json.loads((folder / "vq" / "config.json").read_text())
    var = json.loads((folder / "transformer" / "config.json").read_text())
    pairs = (("vocab_size", "vocab_size"), ("vae_embed_dim", "z_channels"))
    wrong = [f"{a} {var[a]} vs {vq[b]}" for a, b in pairs if var[a] != vq[b]]
    if wrong:
        raise CheckpointError(
            "the transformer and the VQ-VAE do not belong together: " + ", ".join(wrong) + "."
        )
