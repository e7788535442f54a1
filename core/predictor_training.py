"""Train Dynamic-LLaVA's predictors on a frozen vision-language model (``decodekit train-predictor``).

The recipe is the paper's (arXiv:2412.00876; reference Osilly/dynamic_llava):
at every training forward the predictors read the hidden states at the input of
layer K and draw hard keep/drop decisions by Gumbel-softmax, with the soft
sample's gradient passed straight through; the decisions act as attention masks
on layers K and later (a dropped token's column is removed from every other
query's softmax, each token still sees itself), image tokens by the image
predictor, answer tokens by the output-text predictor. The loss is the answer
tokens' cross-entropy plus ``keep_weight`` times the keep-rate loss of each
predictor, the mean over rows of ``(target - kept share)^2``. The Gumbel
temperature falls from ``tau_start`` to ``tau_end`` geometrically.

The VLM stays frozen (the reference also fine-tunes the LLM, at a lower learning
rate); only the predictors learn. Training data: the zoo's shapes-vqa train
split, the one built-in source, for models whose tokenizer knows its words.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import compat
from .errors import AttachError, ConfigError
from .predictors import (
    PredictorConfig,
    Predictors,
    describe,
    gumbel_keep,
    keep_rate_loss,
    save_predictors,
)
from .token_pruning import text_decoder

ATTN_NAME = "decodekit_predictor_training"
"""The name the decision-masking attention is registered under in transformers' AttentionInterface."""

_OWNERS: dict[int, DecisionMasking] = {}


def policy_attention(query, key, value, attention_mask, scale: float, policy) -> torch.Tensor:
    """The paper's masked attention, computed in full: softmax weights times the keep ``policy``
    ``(B, k)`` (each query's own column always kept), renormalised. ``query`` ``(B, H, q, hd)`` are
    the last ``q`` of the ``k`` positions. Returns ``(B, q, H, hd)``."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)  # (B, H, k, hd)
    value = value.repeat_interleave(groups, dim=1)
    q, k = query.shape[2], key.shape[2]
    scores = torch.matmul(query, key.transpose(2, 3)).float() * scale  # (B, H, q, k)
    if attention_mask is None:
        allowed = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[..., -q:, :k]
    else:
        allowed = attention_mask[..., -q:, :k] > torch.finfo(attention_mask.dtype).min / 2
    weights = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1)
    keep = policy[:, None, None, :k].float()  # (B, 1, 1, k)
    own = torch.zeros(q, k, device=query.device)
    own[torch.arange(q), torch.arange(k - q, k)] = 1.0  # each query's own column
    keep = keep + (1.0 - keep) * own
    weights = weights * keep
    weights = weights / (weights.sum(-1, keepdim=True) + 1e-6)
    return torch.matmul(weights.to(value.dtype), value).transpose(1, 2)


def _masked_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Training attention: layers >= K leave the columns the owner's ``policy`` drops out of every
    softmax (the model's sdpa elsewhere).

    Fast form: with ``A`` the unmasked attention weights, ``sum_j A_ij p_j v_j / sum_j A_ij p_j``
    is sdpa over the values ``[p v, p]``, divided by the last channel; it differs from the
    paper's form only in the rows of dropped tokens (which keep their own column there), rows no
    later token reads: the loss and the kept tokens' gradients are the paper's, a dropped
    token's straight-through gradient reads states computed without its own column. The last
    ``owner.exact_tail`` rows, where the answer tokens are (left padding), are computed in the
    paper's form, so a dropped answer token still sees itself.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    owner = _OWNERS.get(id(module))
    if owner is None:
        raise RuntimeError(
            f"this model's attention is set to decodekit's {ATTN_NAME} outside predictor training"
        )
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    policy = owner.policy
    if policy is None or module.layer_idx < owner.layer:
        return sdpa(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    k = key.shape[2]
    p = policy[:, None, :k, None].to(value.dtype)  # (B, 1, k, 1)
    values = torch.cat([value * p, p.expand(*value.shape[:3], 1)], -1)  # (B, Hkv, k, hd + 1)
    out, _ = sdpa(module, query, key, values, attention_mask, scaling=scale, **kwargs)
    out = out[..., :-1] / (out[..., -1:] + 1e-6)  # (B, q, H, hd)
    tail = min(owner.exact_tail, query.shape[2])
    if tail:
        exact = policy_attention(query[:, :, -tail:], key, value, attention_mask, scale, policy)
        out = torch.cat([out[:, :-tail], exact.to(out.dtype)], 1)
    return out.contiguous(), None


class DecisionMasking:
    """While attached, ``decide(hidden)`` at layer K's input gives a ``(B, L)`` keep policy (0/1 with
    straight-through gradients) that masks the attention of layers K and later."""

    def __init__(self, model: Any, layer: int, decide: Callable[[torch.Tensor], torch.Tensor]):
        self.decoder = text_decoder(model)
        n = len(self.decoder.layers)
        if not 1 <= layer < n:
            raise AttachError(
                f"predictor layer must be in [1, {n - 1}] for this model, got {layer}"
            )
        self.layer = layer
        self.decide = decide
        self.policy: torch.Tensor | None = None
        self.exact_tail = 0  # last rows computed in the paper's exact form (the answers)

    def __enter__(self) -> DecisionMasking:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTN_NAME, _masked_attention)
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)  # boolean masks, True = attend
        self._impl = compat.attn_implementation(self.decoder)
        self._attns = [block.self_attn for block in self.decoder.layers]
        for a in self._attns:
            _OWNERS[id(a)] = self
        self.decoder.set_attn_implementation(ATTN_NAME)
        self._handle = self.decoder.layers[self.layer].register_forward_pre_hook(
            self._pre_layer, with_kwargs=True
        )
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        for a in self._attns:
            _OWNERS.pop(id(a), None)
        self.decoder.set_attn_implementation(self._impl)
        self.policy = None

    def _pre_layer(self, module, args: tuple, kwargs: dict[str, Any]):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.policy = self.decide(hidden)


def _frozen(model: Any) -> list[tuple[torch.nn.Parameter, bool]]:
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    return saved


def build_batch(
    processor: Any, items: Sequence[Any], prompt_of, answer_of
) -> dict[str, torch.Tensor]:
    """Tokenised prompt + answer rows (left padded) with ``labels`` on the answer tokens only."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    prompts = [prompt_of(it) for it in items]
    answers = [answer_of(it) for it in items]
    enc = processor(
        images=[it.image for it in items],
        text=[p + a for p, a in zip(prompts, answers)],
        return_tensors="pt",
        padding=True,
    )
    ids = enc["input_ids"]
    labels = torch.full_like(ids, -100)
    for b, a in enumerate(answers):
        n = len(tok(a, add_special_tokens=False)["input_ids"])
        labels[b, ids.shape[1] - n :] = ids[b, ids.shape[1] - n :]
    enc["labels"] = labels
    return dict(enc)


def train_predictors(
    model: Any,
    processor: Any,
    items: Sequence[Any],
    *,
    prompt_of: Callable[[Any], str],
    answer_of: Callable[[Any], str],
    layer: int = 2,
    image_keep_ratio: float = 0.2,
    text_keep_ratio: float = 0.5,
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 1e-3,
    keep_weight: float = 100.0,
    tau_start: float = 1.0,
    tau_end: float = 0.1,
    d_model: int | None = None,
    heads: int = 4,
    ffn: int | None = None,
    blocks: int = 2,
    seed: int = 0,
    exact_attention: bool = False,
    log_every: int = 10,
    log: Callable[[str], None] | None = None,
) -> tuple[Predictors, dict[str, Any]]:
    """Train an image and an output-text predictor on ``model`` (left frozen) over ``items``.

    ``prompt_of(item)`` and ``answer_of(item)`` give each row's prompt (with the image
    token) and the answer text that follows it; the loss is computed on the answer.
    ``exact_attention`` computes every row of the masked attention in the paper's form (about six
    times slower on a CPU); by default the sdpa form of `_masked_attention` runs, which gives
    the same loss and straight-through gradients up to each token's own-column term.
    Returns the predictors (eval mode, on the CPU) and a training record.
    """
    decoder = text_decoder(model)
    hidden = decoder.config.hidden_size
    image_id = getattr(
        model.config, "image_token_id", getattr(model.config, "image_token_index", None)
    )
    if image_id is None:
        raise AttachError(
            f"{type(model).__name__} has no image_token_id; train-predictor needs a VLM"
        )
    if not items:
        raise ConfigError("items", "no training items")
    d = d_model or max(16, min(512, hidden // 4 * 4))
    cfg = PredictorConfig(
        hidden_size=hidden,
        layer=layer,
        d_model=d,
        heads=heads,
        ffn=ffn or 4 * d,
        layers=blocks,
        image_keep_ratio=image_keep_ratio,
        text_keep_ratio=text_keep_ratio,
    )
    torch.manual_seed(seed)
    weight = next(model.parameters())
    predictors = Predictors(cfg).to(device=weight.device, dtype=torch.float32).train()
    gen = torch.Generator(device=weight.device).manual_seed(seed)
    opt = torch.optim.AdamW(predictors.parameters(), lr=lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(seed)
    current: dict[str, torch.Tensor] = {}
    tau = tau_start

    def decide(h: torch.Tensor) -> torch.Tensor:
        image, answer = current["image"], current["answer"]  # (B, L) bool
        B, L = image.shape
        n = int(image[0].sum())
        hf = h.float()
        img = gumbel_keep(predictors.image(hf[image].view(B, n, -1)), tau, gen)  # (B, n)
        txt = gumbel_keep(predictors.text(hf[answer]), tau, gen)  # (answer tokens,)
        policy = torch.ones(B, L, device=h.device)
        policy = policy.masked_scatter(image, img.flatten())
        policy = policy.masked_scatter(answer, txt)
        current["image_decisions"], current["text_policy"] = img, policy
        return policy

    history: list[dict[str, float]] = []
    saved = _frozen(model)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with DecisionMasking(model, layer, decide) as masking:
            for step in range(steps):
                tau = tau_start * (tau_end / tau_start) ** (step / max(1, steps - 1))
                pick = torch.randint(len(items), (batch_size,), generator=order).tolist()
                batch = build_batch(processor, [items[i] for i in pick], prompt_of, answer_of)
                batch = {k: v.to(weight.device) for k, v in batch.items()}
                if "pixel_values" in batch:
                    batch["pixel_values"] = batch["pixel_values"].to(weight.dtype)
                labels = batch.pop("labels")
                ids = batch["input_ids"]
                counts = (ids == image_id).sum(1)
                if int(counts.min()) != int(counts.max()):
                    raise ConfigError("items", "every row needs the same number of image tokens")
                current["image"] = ids == image_id
                # answer tokens as inputs: the positions whose K/V a decode step would admit
                current["answer"] = (labels != -100) & (batch["attention_mask"].bool())
                masking.exact_tail = (
                    ids.shape[1] if exact_attention else int(current["answer"].sum(1).max()) + 1
                )
                logits = model(**batch).logits.float()  # (B, L, V)
                lm = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
                )
                img_dec = current["image_decisions"]
                txt_dec, answer = current["text_policy"], current["answer"]
                img_loss = keep_rate_loss(img_dec, image_keep_ratio)
                # pooled over the batch's answer tokens: a one-word answer makes a row's own
                # kept share 0 or 1 (the reference trains this predictor on long answers only)
                txt_loss = keep_rate_loss(txt_dec[answer][None], text_keep_ratio)
                loss = lm + keep_weight * (img_loss + txt_loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                row = {
                    "step": step + 1,
                    "tau": tau,
                    "loss": loss.item(),
                    "lm_loss": lm.item(),
                    "image_keep": img_dec.mean().item(),
                    "text_keep": txt_dec[answer].mean().item(),
                }
                history.append(row)
                if log is not None and (step + 1) % log_every == 0:
                    log(
                        f"step {step + 1}/{steps}  loss {row['loss']:.4f}  lm {row['lm_loss']:.4f}  "
                        f"image keep {row['image_keep']:.3f}  text keep {row['text_keep']:.3f}  "
                        f"tau {tau:.3f}"
                    )
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(was_training)
    seconds = time.perf_counter() - start
    predictors = predictors.cpu().eval()
    tail = history[-min(len(history), 20) :]
    record = {
        "predictor": describe(predictors),
        "recipe": {
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "optimizer": "AdamW, weight decay 0",
            "keep_weight": keep_weight,
            "tau": [tau_start, tau_end],
            "image_keep_ratio": image_keep_ratio,
            "text_keep_ratio": text_keep_ratio,
            "seed": seed,
            "vlm": "frozen",
            "attention": "paper form" if exact_attention else "sdpa form (answer rows exact)",
        },
        "seconds": seconds,
        "last_20_steps_mean": {
            k: sum(r[k] for r in tail) / len(tail)
            for k in ("loss", "lm_loss", "image_keep", "text_keep")
        },
        "history": history,
    }
    return predictors, record


# -- the command ----------------------------------------------------------------------------
def shapes_vqa_format() -> tuple[Callable[[Any], str], Callable[[Any], str]]:
    """(prompt_of, answer_of) as the zoo's shapes VLM was trained: ``<image> question``, then the
    answer (a word or a caption) and ``</s>``."""
    from decodekit.pipelines.zoo.train_shapes_vlm import prompt_text

    return (lambda it: prompt_text(it.question)), (lambda it: f" {it.answer} </s>")


def evaluate_answers(model: Any, processor: Any, items: Sequence[Any], strategies: list) -> dict:
    """shapes-vqa accuracy of greedy answers with ``strategies`` attached (none: the baseline)."""
    from decodekit.pipelines.zoo.shapes_vqa import accuracy
    from decodekit.pipelines.zoo.train_shapes_vlm import generate_answers

    from .session import attach

    if not strategies:
        return accuracy(generate_answers(model, processor, list(items)), items)
    with attach(model, strategies) as run:
        texts = generate_answers(model, processor, list(items))
        stats = run.strategies[0].stats()
    return {**accuracy(texts, items), "stats": stats}


def check_shapes_vocabulary(tokenizer: Any, where: str) -> None:
    """Refuse a model whose tokenizer does not know shapes-vqa's words (the only built-in data)."""
    from decodekit.pipelines.zoo.shapes_vqa import vqa_words

    unk = tokenizer.unk_token_id
    missing = [
        w
        for w in vqa_words()
        if unk is not None and unk in tokenizer(w, add_special_tokens=False)["input_ids"]
    ]
    if missing:
        raise ConfigError(
            where,
            "train-predictor's only built-in data is the zoo's shapes-vqa questions, and this "
            f"model's tokenizer does not know {', '.join(missing)}; train on a shapes VLM "
            "(zoo:shapes-vlm) or call decodekit.predictor_training.train_predictors with your own items",
        )


def train_predictor_cli(argv: list[str]) -> int:
    """``decodekit train-predictor MODEL --out DIR [...]``: train and save a predictor pair."""
    p = argparse.ArgumentParser(
        prog="decodekit train-predictor",
        description="Train Dynamic-LLaVA's image and output-text predictors on a frozen VLM "
        "(shapes-vqa train split) and write predictor.safetensors, predictor.json, training.json.",
    )
    p.add_argument("model", help="a VLM folder or zoo:<name> (a shapes VLM)")
    p.add_argument("--out", help="output folder (default: <model folder>/predictor)")
    p.add_argument("--layer", type=int, default=2, help="K (paper: 2)")
    p.add_argument(
        "--keep-ratio", type=float, default=0.2, help="image keep rate target (paper: 0.2)"
    )
    p.add_argument(
        "--text-keep-ratio", type=float, default=0.5, help="decoded-token keep rate target (0.5)"
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--keep-weight", type=float, default=100.0, help="keep-rate loss weight (100)")
    p.add_argument("--d-model", type=int, help="predictor width (default: hidden/4 ... 512)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--blocks", type=int, default=2, help="image predictor encoder blocks (2)")
    p.add_argument("--items", type=int, default=3000, help="training questions drawn (train split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--eval-items",
        type=int,
        default=0,
        help="after training, answer this many selection-split questions without pruning, with "
        "the predictor and with the L2-norm fallback at --keep-ratio (0: skip)",
    )
    p.add_argument(
        "--exact-attention",
        action="store_true",
        help="compute the masked attention in the paper's form in every row (slower; the "
        "default sdpa form differs only in each token's own-column gradient term)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    args = p.parse_args(argv)
    if args.eval_items < 0:
        raise ConfigError("--eval-items", "must be 0 or more")
    for name in ("steps", "batch_size", "items", "threads"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}", "must be at least 1")
    for name in ("keep_ratio", "text_keep_ratio"):
        if not 0.0 < getattr(args, name) <= 1.0:
            raise ConfigError(f"--{name.replace('_', '-')}", "must be in (0, 1]")
    torch.set_num_threads(args.threads)
    from decodekit.pipelines.zoo.shapes_vqa import vqa_items
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = args.model
    if folder.startswith("zoo:"):
        from .config import _resolve_zoo

        folder = _resolve_zoo(folder[4:], "MODEL")
    if not Path(folder).is_dir():
        raise ConfigError("MODEL", f"no model folder at {folder!r}")
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    if (
        getattr(model.config, "image_token_id", getattr(model.config, "image_token_index", None))
        is None
    ):
        raise ConfigError("MODEL", f"{type(model).__name__} is not a vision-language model")
    check_shapes_vocabulary(processor.tokenizer, "MODEL")
    prompt_of, answer_of = shapes_vqa_format()
    items = vqa_items(args.items, seed=args.seed, split="train")
    predictors, record = train_predictors(
        model,
        processor,
        items,
        prompt_of=prompt_of,
        answer_of=answer_of,
        layer=args.layer,
        image_keep_ratio=args.keep_ratio,
        text_keep_ratio=args.text_keep_ratio,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        keep_weight=args.keep_weight,
        d_model=args.d_model,
        heads=args.heads,
        blocks=args.blocks,
        seed=args.seed,
        exact_attention=args.exact_attention,
        log=print,
    )
    out = Path(args.out) if args.out else Path(folder) / "predictor"
    save_predictors(predictors, out)
    record.update(
        model=args.model,
        data={"source": "shapes-vqa", "split": "train", "items": args.items, "seed": args.seed},
        threads=args.threads,
        torch=torch.__version__,
    )
    if args.eval_items:
        from decodekit.pipelines.zoo.shapes_vqa import vqa_items as items_of
        from decodekit.plugins.dynamic_llava import DynamicLLaVA

        held_out = items_of(args.eval_items, seed=args.seed, split="selection")
        model.eval()
        evals = {"split": "selection", "items": args.eval_items, "keep_ratio": args.keep_ratio}
        for name, strategies in {
            "baseline": [],
            "predictor": [
                DynamicLLaVA(layer=args.layer, keep_ratio=args.keep_ratio, predictor=str(out))
            ],
            "l2-norm": [DynamicLLaVA(layer=args.layer, keep_ratio=args.keep_ratio)],
        }.items():
            evals[name] = evaluate_answers(model, processor, held_out, strategies)
            print(
                f"{name}: accuracy {evals[name]['overall']:.3f} on {args.eval_items} selection questions"
            )
        record["evaluation"] = evals
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"wrote {out} ({record['predictor']['parameters']} parameters, {record['seconds']:.0f} s)"
    )
    return 0
