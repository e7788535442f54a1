"""Load a masked diffusion LM checkpoint as a bidirectional transformers model.

`load_bidirectional_lm` gives `MaskedDiffusionLMPipeline` a model that
transformers' own modeling code runs (no ``trust_remote_code``), so strategies
such as dkv-cache can hook its attention modules: Dream (Ye et al., "Dream 7B",
arXiv:2508.15487) loads as a bidirectional Qwen2; LLaDA (Nie et al., "Large
Language Diffusion Models", arXiv:2502.09992) is converted once with
``decodekit convert-llada``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_bidirectional_lm"]


def load_bidirectional_lm(source: str, **kwargs: Any) -> Any:
    """A masked diffusion LM from ``source`` with transformers' own modeling code.

    ``kwargs`` go to ``from_pretrained`` (``dtype``, ``local_files_only``, ...).

    - ``model_type: Dream`` (Dream-v0-7B): Dream is Qwen2.5 adapted to masked
      diffusion, with Qwen2's weights under Qwen2's names (sglang serves it as
      ``Qwen2ForCausalLM`` with encoder-only attention). It loads as
      ``Qwen2ForCausalLM`` with ``is_causal = False``, without its remote code, so
      dkv-cache can hook it. Generate with ``shift=True`` (and ``schedule="dream"``).
    - ``model_type: llada``: refused; LLaDA's modeling code cannot be hooked, and
      ``decodekit convert-llada SRC DST`` writes it as a Llama once.
    - anything else: ``AutoModelForCausalLM``; its config must say ``is_causal: false``.

    Raises ``ValueError`` with what to do when the model cannot be used.
    """
    from transformers import AutoModelForCausalLM, PretrainedConfig

    local = {"local_files_only": kwargs["local_files_only"]} if "local_files_only" in kwargs else {}
    raw, _ = PretrainedConfig.get_config_dict(source, **local)
    model_type = raw.get("model_type")
    if model_type == "llada":
        raise ValueError(
            f"{source} is a LLaDA checkpoint, whose own modeling code (trust_remote_code) "
            "decodekit does not load; convert it once with `decodekit convert-llada "
            f"{source} DST` and load DST."
        )
    if str(model_type).lower() == "dream":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        fields = {k: v for k, v in raw.items() if k not in ("auto_map", "model_type")}
        config = Qwen2Config.from_dict({**fields, "architectures": ["Qwen2ForCausalLM"]})
        config.is_causal = False
        return Qwen2ForCausalLM.from_pretrained(source, config=config, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if getattr(model.config, "is_causal", True):
        raise ValueError(
            f"{source} is a causal model (config.is_causal is not False); masked diffusion "
            'needs bidirectional attention: set "is_causal": false in its config.json.'
        )
    return model
