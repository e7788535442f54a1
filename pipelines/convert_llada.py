"""Convert a LLaDA checkpoint (``model_type: llada``) to a bidirectional transformers Llama.

LLaDA-8B and LLaDA-1.5 ship their own modeling code (``trust_remote_code``), whose
attention transformers' ``AttentionInterface`` cannot reach, so dkv-cache cannot hook
it. Their block is a Llama block under other names: RMSNorm before attention and
MLP, RoPE with rotate-half, SiLU gate (``ff_proj``) times ``up_proj``, no biases,
K/V heads repeated per group. So the weights load, renamed and unchanged, into
``LlamaForCausalLM`` with ``is_causal = False``. The conversion is done once, on
disk, shard by shard (a shard's tensors in memory at a time); afterwards the folder
is an ordinary transformers checkpoint:

    decodekit convert-llada ~/LLaDA-8B-Instruct ~/LLaDA-8B-Instruct-llama

    model = AutoModelForCausalLM.from_pretrained("~/LLaDA-8B-Instruct-llama")
    pipe = MaskedDiffusionLMPipeline(model, tokenizer)   # mask id from the config

Configurations the renaming would not reproduce exactly (other block types or
activations, biases, Q/K norms, ALiBi, scaled logits or embeddings, grouped blocks)
are refused with the option that stands in the way. Weights are read from
safetensors only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..errors import DecodekitError

# LLaDA name (after the "model.transformer." prefix) -> Llama name
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ff_norm": "post_attention_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_proj": "mlp.gate_proj",  # the SiLU input: silu(ff_proj x) * up_proj x
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}
_TOP = {"wte": "model.embed_tokens", "ln_f": "model.norm", "ff_out": "lm_head"}
_KEY = re.compile(r"^(?:model\.)?transformer\.(?:blocks\.(\d+)\.)?(\w+)\.weight$")

# option -> the values under which a LLaDA block computes what a Llama block does
# (an absent option takes LLaDA's default, the first value); anything else is refused
_REQUIRED: dict[str, tuple[Any, ...]] = {
    "block_type": ("llama",),
    "activation_type": ("silu",),
    "layer_norm_type": ("rms",),
    "layer_norm_with_affine": (True,),
    "rope": (True,),
    "alibi": (False,),
    "attention_layer_norm": (False,),
    "include_bias": (False,),
    "include_qkv_bias": (False,),
    "bias_for_layer_norm": (None, False),
    "input_emb_norm": (False,),
    "scale_logits": (False,),
    "multi_query_attention": (None, False),
    "block_group_size": (1,),
    "clip_qkv": (None,),
}

# tokenizer and generation files carried over unchanged
_CARRIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


class CheckpointError(DecodekitError, ValueError):
    """A checkpoint that cannot be converted, with what stands in the way."""


def llama_config(llada: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of the Llama that computes what a LLaDA config describes."""
    if llada.get("model_type") != "llada":
        raise CheckpointError(
            f"expected a LLaDA config (model_type 'llada'), got model_type "
            f"{llada.get('model_type')!r}; only LLaDA checkpoints are converted."
        )
    for key, allowed in _REQUIRED.items():
        got = llada.get(key, allowed[0])
        if got not in allowed:
            raise CheckpointError(
                f"config.json has {key}={got!r}; a Llama block needs {key}={allowed[0]!r}, so "
                "this LLaDA variant cannot be converted without changing what it computes."
            )
    if llada.get("rope_scaling"):
        raise CheckpointError(
            f"config.json has rope_scaling={llada['rope_scaling']!r}; only plain RoPE converts."
        )
    missing = [k for k in ("d_model", "n_heads", "n_layers") if not llada.get(k)]
    if missing:
        raise CheckpointError(f"config.json lacks {', '.join(missing)}; is it a LLaDA config?")
    d_model, heads = int(llada["d_model"]), int(llada["n_heads"])
    if d_model % heads:
        raise CheckpointError(f"d_model {d_model} is not a multiple of n_heads {heads}.")
    kv_heads = int(llada.get("n_kv_heads") or heads)
    intermediate = llada.get("mlp_hidden_size") or int(llada.get("mlp_ratio", 4)) * d_model
    vocab = int(llada.get("embedding_size") or llada["vocab_size"])
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "is_causal": False,
        "hidden_size": d_model,
        "intermediate_size": int(intermediate),
        "num_hidden_layers": int(llada["n_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": d_model // heads,
        "hidden_act": "silu",
        "rms_norm_eps": float(llada.get("rms_norm_eps", 1e-5)),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(llada["rope_theta"])},
        "max_position_embeddings": int(llada.get("max_sequence_length", 4096)),
        "vocab_size": vocab,
        "tie_word_embeddings": bool(llada.get("weight_tying", False)),
        "attention_bias": False,
        "mlp_bias": False,
        "use_cache": False,
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id"):
        if llada.get(key) is not None:
            out[key] = llada[key]
    dtype = llada.get("torch_dtype") or llada.get("dtype")
    if dtype:
        out["dtype"] = dtype
    return out


def llama_key(key: str) -> str:
    """The Llama name of a LLaDA weight (``model.transformer.blocks.3.ff_proj.weight`` ->
    ``model.layers.3.mlp.gate_proj.weight``)."""
    m = _KEY.match(key)
    names = _TOP if m and m.group(1) is None else _BLOCK
    if m is None or m.group(2) not in names:
        raise CheckpointError(
            f"unexpected weight {key!r} in the checkpoint: not a weight of a LLaDA Llama block."
        )
    if m.group(1) is None:
        return f"{names[m.group(2)]}.weight"
    return f"model.layers.{m.group(1)}.{names[m.group(2)]}.weight"


def _shards(src: Path) -> tuple[list[str], dict[str, Any] | None]:
    index = src / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        return sorted(set(data["weight_map"].values())), data
    if (src / "model.safetensors").exists():
        return ["model.safetensors"], None
    pickled = [p.name for p in src.glob("*.bin")] + [p.name for p in src.glob("*.pt")]
    raise CheckpointError(
        f"no safetensors weights in {src} (model.safetensors or model.safetensors.index.json)"
        + (
            f"; found {', '.join(sorted(pickled))}, a pickle format, which decodekit does not "
            "read: download the checkpoint's .safetensors files instead."
            if pickled
            else "."
        )
    )


def convert(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write ``src`` (a LLaDA checkpoint folder) as a Llama checkpoint folder ``dst``.

    ``dst`` must not exist. Everything is written into ``dst.partial`` first and renamed
    at the end, so an interrupted or refused conversion leaves no ``dst`` behind.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not (src / "config.json").exists():
        raise CheckpointError(f"{src} has no config.json; give the folder of a LLaDA checkpoint.")
    if dst.exists():
        raise CheckpointError(f"{dst} exists; give a new folder to write the converted model to.")
    config = llama_config(json.loads((src / "config.json").read_text()))
    shards, index = _shards(src)
    partial = dst.with_name(dst.name + ".partial")
    if partial.exists():
        raise CheckpointError(
            f"{partial} exists, left by a conversion that was killed; remove it and run again."
        )
    partial.mkdir(parents=True)
    try:
        seen: dict[str, str] = {}
        for shard in shards:
            tensors = {}
            with safe_open(src / shard, framework="pt") as f:
                for key in f.keys():
                    name = llama_key(key)
                    if name in seen:
                        raise CheckpointError(f"{key!r} and {seen[name]!r} both map to {name!r}.")
                    seen[name] = key
                    tensors[name] = f.get_tensor(key).contiguous()
            save_file(tensors, partial / shard, metadata={"format": "pt"})
        _check_complete(config, seen)
        if index is not None:
            weight_map = {llama_key(k): v for k, v in index["weight_map"].items()}
            (partial / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": index.get("metadata", {}), "weight_map": weight_map})
            )
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in _CARRIED:
            if (src / name).exists():
                _carry(src / name, partial / name)
        partial.rename(dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dst


def _check_complete(config: dict[str, Any], seen: dict[str, str]) -> None:
    want = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config["tie_word_embeddings"]:
        want.add("lm_head.weight")
    for i in range(config["num_hidden_layers"]):
        want |= {f"model.layers.{i}.{v}.weight" for v in _BLOCK.values()}
    missing = sorted(want - set(seen))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(
            f"the checkpoint lacks weights for {', '.join(missing[:3])}{more}: is it complete?"
        )


def _carry(src: Path, dst: Path) -> None:
    """Copy a tokenizer file; a tokenizer config loses ``auto_map`` (no remote code)."""
    if src.name != "tokenizer_config.json":
        shutil.copyfile(src, dst)
        return
    data = json.loads(src.read_text())
    data.pop("auto_map", None)
    dst.write_text(json.dumps(data, indent=2) + "\n")


def convert_cli(argv: list[str]) -> int:
    """``decodekit convert-llada SRC DST``."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="decodekit convert-llada",
        description="Write a LLaDA checkpoint (safetensors) as a bidirectional transformers "
        "Llama checkpoint that dkv-cache can hook.",
    )
    ap.add_argument("src", help="folder of the LLaDA checkpoint (config.json, *.safetensors)")
    ap.add_argument("dst", help="new folder for the converted checkpoint")
    args = ap.parse_args(argv)
    out = convert(args.src, args.dst)
    print(f"wrote {out} (LlamaForCausalLM, is_causal=False)")
    return 0
