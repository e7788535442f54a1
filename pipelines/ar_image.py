"""Autoregressive text-to-image over VQ codes: `ARImagePipeline` and its `ImageTokenDecoder`.

A LlamaGen-style pipeline: a Hugging Face causal LM reads a caption and a
begin-of-image token and generates ``H x W`` image codes in raster order; a
diffusers ``VQModel`` turns the codes into pixels. The LM's vocabulary holds
the caption tokens, ``boi_token_id`` (and optionally ``eoi_token_id``) and the
codebook: VQ index ``k`` is LM token ``code_offset + k``. A row is

    [pad ... pad, caption tokens (with the tokenizer's own bos/eos), BOI, c_0 ... c_{HW-1}]

left-padded to ``max_prompt_tokens + 1`` with ``pad_token_id``; pads are
masked out and position ids start at 0 at each row's first real token, so a
row's result does not depend on its batch mates.

Classifier-free guidance (``guidance_scale > 1``) is a doubled batch owned by
the decoder: the unconditional rows carry ``null_prompt`` instead of the caption
and are fed the same image tokens; logits combine as
``uncond + s * (cond - uncond)`` (`classifier_free_guidance`, convention
``"standard"``). Each image position's distribution is then: the code columns
of the logits only (the per-position constraint; a model with forbidden codes
at some positions passes ``position_constraint``), the sampler's processors
(temperature, top-k, top-p), softmax — or one-hot at the argmax when greedy.

The image span is decoded through an `ImageTokenDecoder`, the contract a
token-autoregression strategy (``sjd``) uses through the runtime hook
``decodekit_image_tokens(run, decoder)``; without one the pipeline calls
`ImageTokenDecoder.decode_plain` (one forward per position, each row drawing
from its own generator). Its adapter, ``ar-image``, is in
``decodekit.pipelines.ar_image_adapter``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from decodekit.logits_processors import classifier_free_guidance
from decodekit.sampler import Sampler, check_generator
from decodekit.session import attached_run

__all__ = [
    "ARImageConfig",
    "ARImageOutput",
    "ARImagePipeline",
    "ImageTokenDecoder",
]

CONFIG_NAME = "ar_image.json"
"""The file of an ar-image folder that says how the LM's vocabulary is laid out."""


@dataclass(frozen=True)
class ARImageConfig:
    """The vocabulary layout of an image-token LM (``ar_image.json`` in a model folder).

    Attributes:
        image_tokens: ``(H, W)`` codes per image (raster order, row-major).
        code_offset: LM token id of VQ code 0; codes are ``[code_offset, code_offset + codebook_size)``.
        codebook_size: K, the number of VQ codes.
        boi_token_id: begin-of-image token, the last prompt token.
        pad_token_id: left padding of prompts (masked out).
        max_prompt_tokens: prompts are padded to this many tokens (BOI not counted);
            a longer prompt is an error.
        eoi_token_id: end-of-image token, or None (never generated here).
        null_prompt: the caption of the unconditional rows under guidance
            (what training put in place of dropped captions).
        num_classes: C for a class-conditional model (LlamaGen c2i), else None. Its
            prompts are class ids: each row is the single LM token
            ``class_token_offset + class_id``, which plays BOI's part (it predicts
            code 0); the unconditional rows under guidance take the null class ``C``.
            ``boi_token_id``, ``pad_token_id``, ``max_prompt_tokens`` and ``null_prompt``
            are then unused, and the pipeline needs no tokenizer.
        class_token_offset: LM token id of class 0 (class-conditional models).
    """

    image_tokens: tuple[int, int]
    code_offset: int
    codebook_size: int
    boi_token_id: int
    pad_token_id: int
    max_prompt_tokens: int
    eoi_token_id: int | None = None
    null_prompt: str = ""
    num_classes: int | None = None
    class_token_offset: int | None = None

    def __post_init__(self):
        h, w = self.image_tokens
        object.__setattr__(self, "image_tokens", (int(h), int(w)))
        if h < 1 or w < 1:
            raise ValueError(f"image_tokens must be two positive ints, got {self.image_tokens}.")
        if self.codebook_size < 1 or self.code_offset < 0 or self.max_prompt_tokens < 1:
            raise ValueError(
                "codebook_size and max_prompt_tokens must be >= 1 and code_offset >= 0, got "
                f"{self.codebook_size}, {self.max_prompt_tokens}, {self.code_offset}."
            )
        codes = range(self.code_offset, self.code_offset + self.codebook_size)
        if self.boi_token_id in codes or self.pad_token_id in codes:
            raise ValueError(
                f"boi_token_id ({self.boi_token_id}) and pad_token_id ({self.pad_token_id}) "
                f"must lie outside the code range [{codes.start}, {codes.stop})."
            )
        if (self.num_classes is None) != (self.class_token_offset is None):
            raise ValueError("num_classes and class_token_offset are given together or not at all.")
        if self.num_classes is not None:
            classes = range(self.class_token_offset, self.class_token_offset + self.num_classes + 1)
            overlap = classes.start < codes.stop and codes.start < classes.stop
            if self.num_classes < 1 or classes.start < 0 or overlap:
                raise ValueError(
                    f"class tokens [{classes.start}, {classes.stop}) (num_classes {self.num_classes} "
                    f"and the null class) must be >= 0 and lie outside the code range "
                    f"[{codes.start}, {codes.stop})."
                )

    @property
    def num_positions(self) -> int:
        """N = H * W image positions."""
        return self.image_tokens[0] * self.image_tokens[1]

    @classmethod
    def from_json(cls, path: str | Path) -> ARImageConfig:
        """Read ``ar_image.json``; unknown keys are errors."""
        data = json.loads(Path(path).read_text())
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}.")
        return cls(**data)

    def to_json(self, path: str | Path) -> None:
        """Write ``ar_image.json``."""
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")


@dataclass
class ARImageOutput:
    """What an `ARImagePipeline` call returns."""

    images: list[Any] | None
    """PIL images, one per prompt; None with ``output_type="codes"``."""
    codes: torch.Tensor
    """Long ``(B, H*W)``: the VQ code of each image position (0-based), raster order."""
    forwards: int = 0
    """LM forwards of the call (the prefill included; a guided batch's is one)."""
    stats: dict[str, Any] = field(default_factory=dict)
    """What a strategy reported through the decoder (empty for plain decoding)."""


class ImageTokenDecoder:
    """The image span of one pipeline call: K/V-cached verification of code tokens, per row.

    ``B`` rows (the user's; under guidance the unconditional copies are hidden
    inside), ``N = H*W`` image positions, ``K`` codes. Each row has committed its
    first ``committed[b]`` positions. `probs_after` feeds tokens after each
    row's committed prefix in one LM forward and returns the target
    distributions; `commit` keeps a prefix of them per row and rolls the rest
    of that row's K/V back. Invariant: ``probs_after(t)[:, 0]`` always equals
    what a fresh full forward over the committed prefix gives.

    K/V rollback ("attention mask with holes"): the decoder keeps one
    transformers ``DynamicCache`` of every slot ever fed and a ``(R, S)`` slot
    mask (``R`` = B, or 2B under guidance). A rolled-back slot of a row is
    masked out for that row alone; each fed token gets its row's own position
    id, so rows may hold different numbers of tokens. Slots masked in every row
    at the end are cropped (``DynamicCache.crop``); when masked slots outnumber
    the held ones the cache is packed (each row's valid slots gathered to the
    front). Attention over masked slots gives them weight exactly 0, so the
    result equals an uncached forward over the committed tokens up to float
    rounding. Tokens committed without K/V of their own (a resampled token that
    differs from the one fed there) are fed at the start of the next call.

    Attributes:
        batch: B.
        length: N.
        vocab_size: K.
        generators: one ``torch.Generator`` per row, or None when greedy.
        sampler: the call's `Sampler` (temperature, top-k, top-p).
        greedy: whether the target is the argmax (one-hot distributions).
        forwards: LM forwards made in this call, the prefill included.
        stats: a dict a strategy may fill; returned in `ARImageOutput.stats`.
    """

    def __init__(
        self,
        model: Any,
        config: ARImageConfig,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        guidance_scale: float = 1.0,
        sampler: Sampler | None = None,
        generators: list[torch.Generator] | None = None,
        position_constraint: Callable[[torch.Tensor], torch.Tensor] | None = None,
        run: Any = None,
        token_ids: torch.Tensor | None = None,
    ):
        from transformers import DynamicCache

        self.model = model
        self.config = config
        self.sampler = sampler if sampler is not None else Sampler()
        self.greedy = self.sampler.greedy
        self.guidance_scale = float(guidance_scale)
        self.guided = self.guidance_scale > 1
        rows = input_ids.shape[0]
        self.batch = rows // 2 if self.guided else rows
        self.length = config.num_positions
        self.vocab_size = config.codebook_size
        if generators is not None and len(generators) != self.batch:
            raise ValueError(f"got {len(generators)} generators for {self.batch} rows.")
        if generators is None and not self.greedy:
            raise ValueError(
                "sampling needs one generator per row (generator=[torch.Generator().manual_seed(s) "
                "for each prompt]); only greedy decoding (temperature=0) runs without."
            )
        self.generators = list(generators) if generators is not None else None
        self.position_constraint = position_constraint
        # LM id of each code (a model family's vocabulary); None: code_offset + code
        self.token_ids = None if token_ids is None else token_ids.to(input_ids.device)
        self.forwards = 0
        self.stats: dict[str, Any] = {}
        self._run = run
        device = input_ids.device
        self._device = device
        self._rows = rows
        self._codes = torch.full((self.batch, self.length), -1, dtype=torch.long, device=device)
        self._committed = torch.zeros(self.batch, dtype=torch.long, device=device)  # (B,)
        # image positions whose K/V are in the cache; the rest of the committed ones are pending
        self._kv_done = torch.zeros(self.batch, dtype=torch.long, device=device)  # (B,)
        self._base = attention_mask.sum(dim=1)  # (R,) position id of image position 0
        self._cache = DynamicCache(config=model.config)
        self._slots = attention_mask.bool()  # (R, S) slots each row attends to
        # Host copies of the per-row counts, updated from the one read `commit` makes, so a
        # step reads nothing else back from the device (a GPU waits at every read).
        self._committed_n = [0] * self.batch
        self._kv_done_n = [0] * self.batch
        held = self._slots.sum(dim=1)  # (R,) slots each row holds
        last = (
            self._slots.any(dim=0) * torch.arange(1, self._slots.shape[1] + 1, device=device)
        ).max()
        *self._held_n, last_n = torch.cat([held, last[None]]).tolist()
        self._last_held = int(last_n) - 1  # the last slot any row holds
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (R, P)
        logits = self._forward(input_ids, attention_mask, position_ids, keep_last=True)
        self._frontier = logits[:, -1]  # (R, K) code logits predicting image position kv_done
        self._fed: torch.Tensor | None = None  # (B, n) tokens of the last probs_after
        self._fed_logits: torch.Tensor | None = None  # (R, W + 1, K)
        self._fed_pending: torch.Tensor | None = None  # (B,) pending tokens fed before them
        self._fed_pending_n: list[int] = []
        self._fed_start = 0  # first slot of the last feed

    # ----------------------------------------------------------------- reading
    @property
    def committed(self) -> torch.Tensor:
        """Long ``(B,)``: image positions each row has committed."""
        return self._committed.clone()

    @property
    def codes(self) -> torch.Tensor:
        """Long ``(B, N)``: committed codes (0-based), -1 where not committed yet."""
        return self._codes.clone()

    @property
    def committed_counts(self) -> list[int]:
        """`committed` as a Python list, kept on the host: reading it never waits for the device."""
        return list(self._committed_n)

    @property
    def done(self) -> bool:
        """Whether every row has committed all N positions (a host check)."""
        return all(c >= self.length for c in self._committed_n)

    # ----------------------------------------------------------------- the contract
    @torch.no_grad()
    def probs_after(self, tokens: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
        """Target distributions after feeding ``tokens`` ``(B, n)`` (codes, 0-based) past each committed prefix.

        Returns ``p`` ``(B, n + 1, K)``: ``p[b, i]`` is the distribution of image
        position ``committed[b] + i`` given the committed prefix and
        ``tokens[b, :i]`` (guided, processed, constrained; one-hot when greedy);
        zeros for positions ``>= N``. One LM forward (none when ``n == 0`` and
        nothing is pending). Feeding again without `commit` first rolls the
        previous feed back. ``validate=False`` skips the check that the tokens are
        codes (a read from the device), for callers whose tokens are codes by
        construction.
        """
        tokens = self._check_tokens(tokens, validate)
        if self._fed is not None:
            self.commit(torch.zeros_like(self._committed))
        batch, n = tokens.shape
        pending = self._committed - self._kv_done  # (B,)
        pending_n = [c - k for c, k in zip(self._committed_n, self._kv_done_n, strict=True)]
        width = max(pending_n) + n if batch else 0
        if width == 0:
            full = self._frontier[:, None]  # (R, 1, K)
        else:
            ids, valid = self._feed_rows(tokens, pending, width)  # (B, W) each
            ids, valid, pos0 = self._both(ids), self._both(valid), self._both(self._kv_done)
            position_ids = (
                self._base[:, None] + pos0[:, None] + torch.arange(width, device=ids.device)
            )
            self._fed_start = self._slots.shape[1]
            self._slots = torch.cat([self._slots, valid], dim=1)  # (R, S + W)
            new = self._forward(ids, self._slots.long(), position_ids)  # (R, W, K)
            full = torch.cat([self._frontier[:, None], new], dim=1)  # (R, W + 1, K)
        index = self._both(pending)[:, None] + torch.arange(n + 1, device=self._device)  # (R, n+1)
        logits = full.gather(1, index[..., None].expand(-1, -1, full.shape[-1]))  # (R, n+1, K)
        self._fed, self._fed_logits, self._fed_pending = tokens, full, pending
        self._fed_pending_n = pending_n
        if width:  # pending tokens now have K/V: they join the prefix for good
            self._keep(pending, pending_n)
        positions = self._committed[:, None] + torch.arange(n + 1, device=self._device)  # (B, n+1)
        return self._target(logits, positions)

    @torch.no_grad()
    def commit(
        self, num: torch.Tensor, tokens: torch.Tensor | None = None, *, validate: bool = True
    ) -> None:
        """Row ``b`` commits ``num[b]`` more positions: ``tokens[b, :num[b]]`` (default: the last fed tokens).

        Fed tokens that agree with the committed ones keep their K/V; the rest
        of the row's feed is rolled back. A committed token that differs from
        the one fed there (a resampled token) has no K/V yet: it is fed first at
        the next `probs_after`, whose ``p[:, 0]`` is right either way.

        ``num`` and the agreement are read back in one transfer (the only read of
        a decoding step); ``validate=False`` skips the check that ``tokens`` are
        codes, a second read.
        """
        num = torch.as_tensor(num, dtype=torch.long, device=self._device).reshape(-1)
        fed = self._fed if self._fed is not None else self._committed.new_zeros(self.batch, 0)
        tokens = fed if tokens is None else self._check_tokens(tokens, validate)
        if num.shape != (self.batch,):
            raise ValueError(
                f"commit takes num (B,) = ({self.batch},), got shape {tuple(num.shape)}."
            )
        # agreement: the first a[b] committed tokens equal what was fed there
        m = min(fed.shape[1], tokens.shape[1])
        same = (fed[:, :m] == tokens[:, :m]).long()  # (B, m)
        agree = same.cumprod(dim=1).sum(dim=1) if m else num.new_zeros(self.batch)
        agree = torch.minimum(agree, num)  # (B,)
        num_n, agree_n = torch.stack([num, agree]).tolist()  # the step's one read
        n = tokens.shape[1]
        if any(k < 0 or k > n for k in num_n):
            raise ValueError(
                f"commit takes num (B,) = ({self.batch},) with 0 <= num[b] <= {n} "
                f"(the tokens given or last fed), got {num_n}."
            )
        if any(c + k > self.length for c, k in zip(self._committed_n, num_n, strict=True)):
            raise ValueError(
                f"commit of {num_n} goes past the {self.length} image positions "
                f"(committed: {self._committed_n})."
            )
        if n:  # row b writes tokens[b, :num[b]] at its positions committed[b] ..
            columns = torch.arange(n, device=self._device)  # (n,)
            write = columns[None] < num[:, None]  # (B, n)
            spill = self._codes.new_full((self.batch, n), -1)  # room past position N
            codes = torch.cat([self._codes, spill], dim=1)  # (B, N + n)
            at = self._committed[:, None] + columns[None]  # (B, n), distinct per row
            codes.scatter_(1, at, torch.where(write, tokens, codes.gather(1, at)))
            self._codes = codes[:, : self.length].contiguous()
        self._committed += num
        self._committed_n = [c + k for c, k in zip(self._committed_n, num_n, strict=True)]
        if self._fed is not None:
            self._roll_back(agree, agree_n)
        self._fed = self._fed_logits = self._fed_pending = None
        self._tidy()

    @torch.no_grad()
    def decode_plain(self) -> torch.Tensor:
        """Decode every remaining position one at a time; returns `codes` ``(B, N)``.

        Each step feeds the last committed token (one forward), draws the next
        code of each unfinished row from ``p[b, 0]`` with that row's generator
        (the argmax when greedy), and commits it.
        """
        nothing = self._committed.new_zeros(self.batch, 0)
        while not self.done:
            p = self.probs_after(nothing, validate=False)[:, 0]  # (B, K)
            active = [c < self.length for c in self._committed_n]
            nxt = self.draw(p, active)  # (B,)
            num = torch.tensor(active, dtype=torch.long, device=self._device)
            self.commit(num, nxt.clamp(min=0)[:, None], validate=False)
        return self.codes

    def draw(
        self, probs: torch.Tensor, rows: torch.Tensor | list[bool] | None = None
    ) -> torch.Tensor:
        """One code per row from ``probs`` ``(B, K)``, each row with its own generator; -1 outside ``rows``.

        ``probs`` are the decoder's own distributions (`probs_after`), so they are not
        checked again; ``rows`` given as a list of bools costs no read from the device.
        """
        batch = probs.shape[0]
        if rows is None:
            active = [True] * batch
        else:
            active = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        if self.greedy:
            keep = torch.tensor(active, dtype=torch.bool, device=probs.device)
            return torch.where(keep, probs.argmax(dim=-1), -1)
        out = torch.full((batch,), -1, dtype=torch.long, device=probs.device)
        for b in range(batch):
            if active[b]:  # the draw sample_categorical makes, without its checks
                out[b] = torch.multinomial(probs[b : b + 1], 1, generator=self.generators[b])[0, 0]
        return out

    # ----------------------------------------------------------------- internals
    def _check_tokens(self, tokens: torch.Tensor, validate: bool = True) -> torch.Tensor:
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self._device)
        if tokens.dim() != 2 or tokens.shape[0] != self.batch:
            raise ValueError(
                f"tokens must be (B, n) = ({self.batch}, n), got {tuple(tokens.shape)}."
            )
        if validate and tokens.numel() and bool(((tokens < 0) | (tokens >= self.vocab_size)).any()):
            raise ValueError(f"tokens must be codes in [0, {self.vocab_size}).")
        return tokens

    def _both(self, t: torch.Tensor) -> torch.Tensor:
        """Rows ``(B, ...)`` repeated for the unconditional copies: ``(R, ...)``."""
        return torch.cat([t, t]) if self.guided else t

    def _feed_rows(
        self, tokens: torch.Tensor, pending: torch.Tensor, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: its pending committed codes, then ``tokens``, then masked padding; LM ids and validity ``(B, W)``."""
        n = tokens.shape[1]
        codes = torch.zeros(self.batch, width, dtype=torch.long, device=self._device)
        col = torch.arange(width, device=self._device)[None]  # (1, W)
        source = (self._kv_done[:, None] + col).clamp(max=self.length - 1)  # (B, W)
        from_codes = self._codes.gather(1, source)  # (B, W)
        is_pending = col < pending[:, None]
        codes = torch.where(is_pending, from_codes, codes)
        j = (col - pending[:, None]).clamp(min=0, max=max(n - 1, 0))  # (B, W)
        fed = tokens.gather(1, j) if n else codes
        is_fed = (col >= pending[:, None]) & (col < pending[:, None] + n)
        codes = torch.where(is_fed, fed, codes)
        ids = self._lm_ids(codes)
        ids = torch.where(is_pending | is_fed, ids, torch.full_like(ids, self.config.pad_token_id))
        return ids, is_pending | is_fed

    def _forward(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        keep_last: bool = False,
    ) -> torch.Tensor:
        """One LM forward through the cache; the code columns of its logits ``(R, W, K)``."""
        self.forwards += 1
        if self._run is not None:
            self._run.nfe += 1
        extra = {"logits_to_keep": 1} if keep_last else {}
        out = self.model(
            input_ids=ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=self._cache,
            use_cache=True,
            **extra,
        )
        if self.token_ids is not None:
            return out.logits.index_select(-1, self.token_ids)  # (R, W, K)
        lo = self.config.code_offset
        return out.logits[..., lo : lo + self.vocab_size]  # (R, W, K)

    def _lm_ids(self, codes: torch.Tensor) -> torch.Tensor:
        if self.token_ids is not None:
            return self.token_ids[codes]
        return codes + self.config.code_offset

    def _keep(self, count: torch.Tensor, count_n: list[int]) -> None:
        """``count[b]`` more image positions of row ``b`` hold K/V; move its frontier logits there."""
        full = self._fed_logits  # (R, W + 1, K)
        self._kv_done = self._kv_done + count
        self._kv_done_n = [k + c for k, c in zip(self._kv_done_n, count_n, strict=True)]
        index = self._both(count)  # (R,)
        self._frontier = full[torch.arange(full.shape[0], device=self._device), index]  # (R, K)

    def _roll_back(self, agree: torch.Tensor, agree_n: list[int]) -> None:
        """Keep the first ``agree[b]`` fed tokens' K/V of each row, mask the rest of the last feed."""
        pending, full = self._fed_pending, self._fed_logits  # (B,), (R, W + 1, K)
        width = full.shape[1] - 1
        if width == 0:
            return
        col = torch.arange(width, device=self._device)[None]  # (1, W)
        keep = self._both(col < (pending + agree)[:, None])  # (R, W)
        self._slots[:, self._fed_start :] &= keep
        kept = [p + a for p, a in zip(self._fed_pending_n, agree_n, strict=True)]  # per row
        kept = kept + kept if self.guided else kept  # (R,)
        self._held_n = [h + k for h, k in zip(self._held_n, kept, strict=True)]
        if max(kept) > 0:
            self._last_held = self._fed_start + max(kept) - 1
        self._kv_done = self._kv_done + agree
        self._kv_done_n = [k + a for k, a in zip(self._kv_done_n, agree_n, strict=True)]
        index = self._both(pending + agree)  # (R,)
        self._frontier = full[torch.arange(full.shape[0], device=self._device), index]

    def _tidy(self) -> None:
        """Crop slots masked in every row at the end; pack the cache when holes dominate.

        Decided from the host's counts (no read from the device).
        """
        length = self._last_held + 1
        drop = self._slots.shape[1] - length
        if drop > 0:
            self._cache.crop(-drop)
            self._slots = self._slots[:, :length]
        most = max(self._held_n)
        if self._slots.shape[1] - most > most:
            # valid slots first, in their order; attention ignores slot order otherwise
            order = torch.sort((~self._slots).to(torch.int8), dim=1, stable=True).indices
            order = order[:, :most]  # (R, S')
            for layer in self._cache.layers:
                if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                    continue
                k_idx = order[:, None, :, None].expand(
                    -1, layer.keys.shape[1], -1, layer.keys.shape[3]
                )
                v_idx = order[:, None, :, None].expand(
                    -1, layer.values.shape[1], -1, layer.values.shape[3]
                )
                layer.keys = layer.keys.gather(2, k_idx)  # (R, H, S', D)
                layer.values = layer.values.gather(2, v_idx)
            self._slots = self._slots.gather(1, order)
            self._last_held = most - 1

    def _target(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Guided, constrained, processed distributions ``(B, n+1, K)`` from code logits ``(R, n+1, K)``."""
        if self.guided:
            cond, uncond = logits.chunk(2)
            logits = classifier_free_guidance(
                cond, uncond, self.guidance_scale, convention="standard"
            )
        if self.position_constraint is not None:
            allowed = self.position_constraint(positions.clamp(max=self.length - 1))  # (B, n+1, K)
            logits = logits.masked_fill(~allowed, float("-inf"))
        probs = self.sampler.probs(logits)  # (B, n+1, K)
        return probs.masked_fill((positions >= self.length)[..., None], 0.0)


class ARImagePipeline:
    """Text-to-image by next-token prediction over VQ codes (LlamaGen-style).

    Args:
        lm: a transformers causal LM over the layout of ``config``.
        vq: a diffusers ``VQModel`` whose codebook is the LM's codes.
        tokenizer: the caption tokenizer (a transformers tokenizer).
        config: the `ARImageConfig` (or its dict).
        position_constraint: optional ``positions (B, n) -> allowed (B, n, K) bool``
            for models that forbid some codes at some positions (every code is
            allowed by default).
        family: a model family of ``decodekit.pipelines.ar_image_families`` (a
            transformers image-generation model run through its own modules; built by
            ``ar_image_families.from_transformers``): it builds the prompts, maps codes
            to LM ids, constrains positions and decodes pixels. None: the layout of
            ``config`` and a diffusers ``VQModel``.
    """

    def __init__(
        self,
        lm: Any,
        vq: Any,
        tokenizer: Any,
        config: ARImageConfig | dict,
        position_constraint: Callable[[torch.Tensor], torch.Tensor] | None = None,
        family: Any = None,
    ):
        self.lm = lm
        self.vq = vq
        self.tokenizer = tokenizer
        self.config = config if isinstance(config, ARImageConfig) else ARImageConfig(**config)
        self.family = family
        if position_constraint is None and getattr(family, "position_constraint", None):
            position_constraint = family.position_constraint
        self.position_constraint = position_constraint
        self.decoder: ImageTokenDecoder | None = None
        """The decoder of the current (or last) call."""
        if family is not None:
            return
        vocab = getattr(lm.config, "vocab_size", None)
        top = self.config.code_offset + self.config.codebook_size
        if vocab is not None and top > vocab:
            raise ValueError(f"codes reach LM id {top - 1} but the LM's vocab_size is {vocab}.")
        vq_codes = getattr(getattr(vq, "config", None), "num_vq_embeddings", None)
        if vq_codes is not None and vq_codes != self.config.codebook_size:
            raise ValueError(
                f"codebook_size {self.config.codebook_size} != the VQModel's num_vq_embeddings {vq_codes}."
            )

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        torch_dtype: torch.dtype | None = None,
        local_files_only: bool = True,
    ) -> ARImagePipeline:
        """Load ``folder``: ``ar_image.json``, ``lm/`` (transformers), ``vq/`` (diffusers ``VQModel``), ``tokenizer/``."""
        from decodekit.pipelines import llamagen  # noqa: F401  (registers model_type "llamagen")
        from diffusers import VQModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file():
            raise ValueError(
                f"{folder} has no {CONFIG_NAME}; an ar-image folder holds {CONFIG_NAME}, lm/, vq/ "
                "and tokenizer/ (see docs/pipelines/ar-image.md). LlamaGen c2i checkpoints "
                "convert with `decodekit convert-llamagen`; Emu3ForConditionalGeneration and "
                "JanusForConditionalGeneration run through "
                "decodekit.pipelines.ar_image_families.from_transformers; other checkpoints are not "
                "supported yet."
            )
        config = ARImageConfig.from_json(folder / CONFIG_NAME)
        dtype = {"dtype": torch_dtype} if torch_dtype is not None else {}
        lm = AutoModelForCausalLM.from_pretrained(
            folder / "lm", local_files_only=local_files_only, **dtype
        ).eval()
        vq_dtype = {"dtype": torch_dtype} if torch_dtype is not None else {}
        vq = VQModel.from_pretrained(folder / "vq", local_files_only=local_files_only, **vq_dtype)
        tokenizer = None  # a class-conditional model (LlamaGen c2i) reads class ids
        if config.num_classes is None or (folder / "tokenizer").is_dir():
            tokenizer = AutoTokenizer.from_pretrained(
                folder / "tokenizer", local_files_only=local_files_only
            )
        return cls(lm, vq.eval(), tokenizer, config)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the folder layout `from_pretrained` reads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.to_json(folder / CONFIG_NAME)
        self.lm.save_pretrained(folder / "lm")
        self.vq.save_pretrained(folder / "vq")
        self.tokenizer.save_pretrained(folder / "tokenizer")

    def to(self, device: str | torch.device) -> ARImagePipeline:
        self.lm.to(device)
        if self.vq is not None:
            self.vq.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    # ------------------------------------------------------------------------ inputs
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` ``(B, max_prompt_tokens + 1)``: left-padded captions, then BOI."""
        cfg = self.config
        if cfg.num_classes is None and not all(isinstance(t, str) for t in prompts):
            raise ValueError(
                f"this model takes captions (text prompts), got {list(prompts)[:8]}; class ids "
                "are for class-conditional models (config.num_classes)."
            )
        if self.family is not None:
            return self.family.encode_prompts(prompts, cfg.max_prompt_tokens + 1)
        if cfg.num_classes is not None:  # class ids (the null class C allowed): one token each
            ok = all(isinstance(c, int) and not isinstance(c, bool) for c in prompts)
            classes = torch.tensor(prompts if ok else [-1], dtype=torch.long)
            if not ok or bool(((classes < 0) | (classes > cfg.num_classes)).any()):
                raise ValueError(
                    f"this model is class-conditional: prompts are class ids in "
                    f"[0, {cfg.num_classes}] ({cfg.num_classes}: the null class), "
                    f"got {list(prompts)[:8]}."
                )
            return (cfg.class_token_offset + classes)[:, None], torch.ones_like(classes)[:, None]
        width = cfg.max_prompt_tokens
        ids = torch.full((len(prompts), width + 1), cfg.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width + 1), dtype=torch.long)
        for i, text in enumerate(prompts):
            row = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
            if len(row) > width:
                raise ValueError(
                    f"prompt {text!r} is {len(row)} tokens; this model takes at most {width}."
                )
            if row:
                ids[i, width - len(row) : width] = torch.tensor(row, dtype=torch.long)
                mask[i, width - len(row) : width] = 1
        ids[:, width] = cfg.boi_token_id
        mask[:, width] = 1
        return ids, mask

    # ------------------------------------------------------------------------ the call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | int | list[str] | list[int],
        *,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
    ) -> ARImageOutput:
        """Generate one image per prompt.

        Args:
            prompt: a caption or a list of captions; for a class-conditional model
                (``config.num_classes``) a class id or a list of them.
            guidance_scale: classifier-free guidance scale; > 1 runs the doubled batch.
            temperature: 0 is greedy (argmax).
            top_k: keep the k most likely codes (None: all).
            top_p: nucleus filtering (None: off).
            generator: one ``torch.Generator`` per prompt (a row's image then does not
                depend on its batch mates), or one shared by all rows; None only when greedy.
            output_type: ``"pil"`` (images and codes) or ``"codes"`` (codes only).
        """
        call_kwargs = dict(
            prompt=prompt,
            guidance_scale=guidance_scale,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            output_type=output_type,
        )
        run = attached_run(self)
        if run is None:
            return self._generate(None, **call_kwargs)
        return run.guarded_call(call_kwargs, lambda: self._generate(run, **call_kwargs))

    def _generate(
        self, run: Any, *, prompt, guidance_scale, temperature, top_k, top_p, generator, output_type
    ) -> ARImageOutput:
        if output_type not in ("pil", "codes"):
            raise ValueError(f"output_type must be 'pil' or 'codes', got {output_type!r}.")
        prompts = [prompt] if isinstance(prompt, (str, int)) else list(prompt)
        if not prompts:
            raise ValueError("no prompts given.")
        decoder = self.decoder_for(
            prompts,
            guidance_scale=guidance_scale,
            sampler=Sampler(temperature=temperature, top_k=top_k, top_p=top_p),
            generator=generator,
            run=run,
        )
        codes = None
        if run is not None and run.has("decodekit_image_tokens"):
            codes = run.call("decodekit_image_tokens", run=run, decoder=decoder)
        if codes is None:
            codes = decoder.decode_plain()
        codes = self._check_codes(codes, decoder)
        images = self.decode_codes(codes) if output_type == "pil" else None
        return ARImageOutput(images, codes, decoder.forwards, dict(decoder.stats))

    def decoder_for(
        self,
        prompts: list[str],
        *,
        guidance_scale: float = 1.0,
        sampler: Sampler | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        run: Any = None,
    ) -> ImageTokenDecoder:
        """The `ImageTokenDecoder` of a call on ``prompts`` (prefilled: one forward made)."""
        sampler = sampler if sampler is not None else Sampler()
        ids, mask = self.encode_prompts(prompts)
        if guidance_scale > 1:
            null = (
                self.config.null_prompt
                if self.config.num_classes is None
                else self.config.num_classes
            )
            if getattr(self.family, "unconditional", None) is not None:  # the family's own rows
                null_ids, null_mask = self.family.unconditional(ids, mask)
            else:
                null_ids, null_mask = self.encode_prompts([null] * len(prompts))
            ids, mask = torch.cat([ids, null_ids]), torch.cat([mask, null_mask])  # (2B, P+1)
        device = self.device
        generators = _row_generators(generator, len(prompts), device)
        decoder = ImageTokenDecoder(
            self.lm,
            self.config,
            ids.to(device),
            mask.to(device),
            guidance_scale=guidance_scale,
            sampler=sampler,
            generators=generators,
            position_constraint=self.position_constraint,
            run=run,
            token_ids=None if self.family is None else self.family.token_ids,
        )
        self.decoder = decoder
        return decoder

    def _check_codes(self, codes: Any, decoder: ImageTokenDecoder) -> torch.Tensor:
        codes = torch.as_tensor(codes, dtype=torch.long)
        want = (decoder.batch, decoder.length)
        if tuple(codes.shape) != want or bool(((codes < 0) | (codes >= decoder.vocab_size)).any()):
            raise ValueError(
                f"decodekit_image_tokens must return codes (B, N) = {want} in "
                f"[0, {decoder.vocab_size}), got {tuple(codes.shape)}."
            )
        return codes

    # ------------------------------------------------------------------------ pixels
    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> list[Any]:
        """PIL images from codes ``(B, H*W)`` through the VQModel."""
        from diffusers.image_processor import VaeImageProcessor

        if self.family is not None:
            return self.family.decode_codes(codes)
        h, w = self.config.image_tokens
        vq = self.vq
        dim = vq.config.vq_embed_dim or vq.config.latent_channels
        shape = (codes.shape[0], h, w, dim)
        indices = codes.reshape(-1).to(next(vq.parameters()).device)
        if vq.config.lookup_from_codebook:
            pixels = vq.decode(indices, force_not_quantize=True, shape=shape).sample
        else:
            quant = vq.quantize.get_codebook_entry(indices, shape)  # (B, C, h, w)
            pixels = vq.decode(quant, force_not_quantize=True).sample  # (B, 3, H', W')
        return VaeImageProcessor(do_resize=False).postprocess(pixels.float(), output_type="pil")

    @torch.no_grad()
    def image_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, H*W)`` of images ``(B, 3, H', W')`` in [-1, 1] (the VQ's encode and quantize)."""
        latents = self.vq.encode(pixels).latents
        _, _, (_, _, indices) = self.vq.quantize(latents)
        return indices.reshape(pixels.shape[0], -1)


def _row_generators(generator, batch: int, device) -> list[torch.Generator] | None:
    if generator is None:
        return None
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * batch
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} generators for {batch} prompts; pass one per prompt.")
    for g in gens:
        check_generator(g, torch.empty(0, device=device), "ARImagePipeline")
    return gens
