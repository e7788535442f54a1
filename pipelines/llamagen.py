"""LlamaGen's class-conditional GPT as a transformers model: `LlamaGenConfig`, `LlamaGenForCausalLM`.

LlamaGen (FoundationVision/LlamaGen, ``autoregressive/models/gpt.py``) is a
Llama-style decoder over ``[class embedding, c_0 ... c_{N-1}]`` whose rotary
embedding is two-dimensional: image position ``g = r * G + c`` (grid ``G x G``)
rotates the first half of each head's dimension pairs by ``r`` and the second
half by ``c``; the class token (position 0) gets an all-zero rotation table, so
its queries and keys are zero. A plain transformers Llama cannot reproduce
this, so this module writes the model out (the released checkpoints' weights
load with their own names: ``tok_embeddings``, ``cls_embedding.embedding_table``,
``layers.{i}.attention.wqkv``/``wo``, ``feed_forward.w1``/``w2``/``w3``,
``attention_norm``, ``ffn_norm``, ``norm``, ``output``).

Input vocabulary (for ``ARImagePipeline``): ids ``[0, K)`` are VQ codes (LlamaGen's
``tok_embeddings``), ids ``[K, K + C]`` are the classes ``0 .. C - 1`` and the
null class ``C`` of classifier-free guidance (rows of ``cls_embedding``). The
logits cover the K codes only. Position ids are LlamaGen's ``input_pos``: 0 for
the class token, ``1 + g`` for image position ``g``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

__all__ = ["LlamaGenConfig", "LlamaGenForCausalLM"]


class LlamaGenConfig(PretrainedConfig):
    """Shape of a LlamaGen c2i GPT (what ``ModelArgs`` and the grid size say)."""

    model_type = "llamagen"

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        intermediate_size: int = 2048,
        codebook_size: int = 16384,
        num_classes: int = 1000,
        grid_size: int = 16,
        cls_token_num: int = 1,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        **kwargs: Any,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size
        self.codebook_size = codebook_size
        self.num_classes = num_classes
        self.grid_size = grid_size
        self.cls_token_num = cls_token_num
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        kwargs.setdefault("vocab_size", codebook_size + num_classes + 1)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


def rope_table(config: LlamaGenConfig) -> torch.Tensor:
    """``(cls_token_num + G*G, head_dim // 2, 2)`` cos/sin per position; zeros for the class tokens."""
    head_dim = config.hidden_size // config.num_attention_heads
    half = head_dim // 2
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    g = config.grid_size
    index = torch.arange(g * g)
    rows, cols = (index // g).float(), (index % g).float()
    angles = torch.cat([rows[:, None] * inv, cols[:, None] * inv], dim=-1)  # (G*G, head_dim//2)
    table = torch.stack([angles.cos(), angles.sin()], dim=-1)
    return torch.cat([torch.zeros(config.cls_token_num, head_dim // 2, 2), table])


def _rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``x`` ``(B, T, H, D)`` by ``table`` ``(B, T, D//2, 2)``, in float32."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, D/2, 2)
    cos, sin = table[:, :, None, :, 0], table[:, :, None, :, 1]
    a, b = pairs[..., 0], pairs[..., 1]
    out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return out.flatten(3).type_as(x)


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x.float()
        return (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(
            x
        ) * self.weight


class _Attention(nn.Module):
    def __init__(self, config: LlamaGenConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.heads
        width = (self.heads + 2 * self.kv_heads) * self.head_dim
        self.wqkv = nn.Linear(config.hidden_size, width, bias=False)
        self.wo = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, table, mask, cache):
        b, t, _ = x.shape
        kv = self.kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.heads * self.head_dim, kv, kv], dim=-1)
        q = _rotate(q.view(b, t, self.heads, self.head_dim), table).transpose(1, 2)
        k = _rotate(k.view(b, t, self.kv_heads, self.head_dim), table).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        group = self.heads // self.kv_heads
        if group > 1:  # grouped K/V heads; repeat_interleave copies even at group 1
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class _FeedForward(nn.Module):
    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _Block(nn.Module):
    def __init__(self, config: LlamaGenConfig, layer_idx: int):
        super().__init__()
        self.attention = _Attention(config, layer_idx)
        self.feed_forward = _FeedForward(config)
        self.attention_norm = _RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = _RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, table, mask, cache):
        h = x + self.attention(self.attention_norm(x), table, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class _LabelEmbedder(nn.Module):
    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.embedding_table = nn.Embedding(config.num_classes + 1, config.hidden_size)


class LlamaGenForCausalLM(PreTrainedModel):
    """LlamaGen's c2i GPT under its own parameter names; ids and positions as the module docstring says.

    ``forward`` takes ``input_ids`` ``(B, T)``, an optional ``attention_mask``
    ``(B, S)`` over every slot held so far (cache plus new tokens; 0 masks a
    slot out), ``position_ids`` ``(B, T)`` and a transformers cache
    (``past_key_values`` or ``cache``). New tokens attend causally by slot order.
    """

    config_class = LlamaGenConfig
    base_model_prefix = ""
    _no_split_modules = ["_Block"]

    def __init__(self, config: LlamaGenConfig):
        super().__init__(config)
        self.cls_embedding = _LabelEmbedder(config)
        self.tok_embeddings = nn.Embedding(config.codebook_size, config.hidden_size)
        self.layers = nn.ModuleList(_Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = _RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.codebook_size, bias=False)
        # float32 in every dtype (LlamaGen's freqs_cis is no buffer: .to(bfloat16) keeps it)
        self.rope = rope_table(config)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)

    def get_input_embeddings(self):
        return self.tok_embeddings

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Code ids through ``tok_embeddings``, class ids through ``cls_embedding``."""
        k = self.config.codebook_size
        is_class = input_ids >= k
        codes = self.tok_embeddings(input_ids.clamp(max=k - 1))
        classes = self.cls_embedding.embedding_table((input_ids - k).clamp(min=0))
        return torch.where(is_class[..., None], classes, codes)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        cache: Any = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        cache = past_key_values if past_key_values is not None else cache
        b, t = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=input_ids.device).expand(b, -1)
        # a draft window may run past the last image position (sjd); what those slots compute
        # is never committed, so they reuse the last position's rotation
        if self.rope.device != input_ids.device:  # moved, or built on the meta device
            self.rope = rope_table(self.config).to(input_ids.device)
        table = self.rope[position_ids.clamp(max=self.rope.shape[0] - 1)]  # (B, T, D/2, 2)
        total = past + t
        slots = torch.arange(total, device=input_ids.device)
        mask = slots[None, :] <= (past + torch.arange(t, device=input_ids.device))[:, None]
        mask = mask[None, None].expand(b, 1, t, total)  # (B, 1, T, S)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, -total:].bool()
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, table, mask, cache)
        h = self.norm(h)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.output(h).float()
        return CausalLMOutputWithPast(logits=logits)


def _register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register("llamagen", LlamaGenConfig)
        AutoModelForCausalLM.register(LlamaGenConfig, LlamaGenForCausalLM)
    except ValueError:  # registered already
        pass


_register()
