"""Token n-gram models for Superposed Decoding: built from a text corpus, stored as safetensors.

An `NGramModel` holds counts of orders 2 to ``max_order`` (default 6) over a
tokenizer's ids and answers, for many contexts and candidate tokens at once,
``P_n(t | last n-1 tokens) = count(context, t) / count(context)`` per order and
their interpolation ``Σ_n w_n P_n`` over the orders whose context was seen (the
rule of the Superposed Decoding reference code: an unseen context adds nothing).

Storage (no pickle): one ``ngram.safetensors`` of int64 arrays and an
``ngram.json`` with the vocabulary size, the orders and the tokenizer. Contexts
are keyed like a trie read backwards: the id of a context of length m is its
index among the sorted keys ``id(context of length m-1) × V + token m back``, so
every key is exact and fits int64. Per context length m:

* ``ctx_keys.m`` (sorted) and ``ctx_totals.m``: contexts and how often they were followed by a token;
* ``pair_keys.m`` (sorted, ``context id × V + next token``) and ``pair_counts.m``.

Build one with ``decodekit ngram build CORPUS --tokenizer MODEL --out DIR``
(`ngram_cli`), load it with ``NGramModel.load(DIR)``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

FILE = "ngram.safetensors"
META = "ngram.json"

DENSE_LIMIT = 1 << 22
"""Orders with at most this many (context, token) cells are also held as a dense int32 table
(16 MiB at most each, built on first use): a look-up is then one gather instead of a binary
search through the sorted pairs. Small vocabularies get it; a 32k vocabulary does not."""

STACKED_LIMIT = 1 << 23
"""The fast small-vocabulary look-up stacks every order's probabilities in one float64
table (plus per-order transition tables of about the same size); above this many cells
(64 MiB) the per-order look-up is used instead."""


class NGramModel:
    """Counts of token n-grams of orders 2..max_order, with batched probability look-ups.

    Args:
        vocab_size: ids are in ``[0, vocab_size)``.
        max_order: the highest order n (context length n - 1).
        arrays: ``{"ctx_keys.m", "ctx_totals.m", "pair_keys.m", "pair_counts.m"}`` for m in 1..max_order-1.
        tokenizer: name of the tokenizer the ids come from (informative).
    """

    def __init__(
        self,
        vocab_size: int,
        max_order: int,
        arrays: dict[str, torch.Tensor],
        tokenizer: str | None = None,
    ):
        if max_order < 2:
            raise ValueError(f"max_order must be at least 2 (bigrams), got {max_order}")
        self.vocab_size = int(vocab_size)
        self.max_order = int(max_order)
        self.tokenizer = tokenizer
        self.arrays = arrays
        names = ("ctx_keys", "ctx_totals", "pair_keys", "pair_counts")
        for m in range(1, max_order):
            for name in names:
                if f"{name}.{m}" not in arrays:
                    raise ValueError(f"n-gram arrays lack {name}.{m}; rebuild the model")
        # numpy views of the same memory, for the look-ups
        self._numpy = {
            m: tuple(arrays[f"{name}.{m}"].cpu().numpy() for name in names)
            for m in range(1, max_order)
        }
        self._dense: dict[int, np.ndarray | None] = {}  # order -> (contexts, V) counts, lazily
        self._small_cache: dict[tuple[float, ...], tuple | None] = {}  # weights -> _small_tables

    # -- building ------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        sequences: Iterable[Sequence[int]],
        vocab_size: int,
        max_order: int = 6,
        tokenizer: str | None = None,
    ) -> NGramModel:
        """Count every n-gram (n = 2..max_order) inside each token sequence (none spans two)."""
        rows = [np.asarray(s, dtype=np.int64) for s in sequences if len(s) > 0]
        tokens = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {vocab_size}); got {tokens.min()}..{tokens.max()}"
            )
        starts = np.repeat(
            np.cumsum([0] + [len(r) for r in rows[:-1]]).astype(np.int64),
            [len(r) for r in rows],
        )  # (N,) start of each token's sequence
        pos = np.arange(tokens.size, dtype=np.int64)
        arrays: dict[str, torch.Tensor] = {}
        ids_prev = np.full(tokens.size, -1, dtype=np.int64)
        for m in range(1, max_order):
            p = pos[pos - m >= starts]  # positions predicted from a full context of m tokens
            back = tokens[p - m]
            key = back if m == 1 else ids_prev[p] * vocab_size + back
            uniq, inv = np.unique(key, return_inverse=True)
            inv = inv.reshape(-1)
            ids = np.full(tokens.size, -1, dtype=np.int64)
            ids[p] = inv
            pairs, counts = np.unique(inv * vocab_size + tokens[p], return_counts=True)
            arrays[f"ctx_keys.{m}"] = torch.from_numpy(uniq.astype(np.int64))
            arrays[f"ctx_totals.{m}"] = torch.from_numpy(
                np.bincount(inv, minlength=uniq.size).astype(np.int64)
            )
            arrays[f"pair_keys.{m}"] = torch.from_numpy(pairs.astype(np.int64))
            arrays[f"pair_counts.{m}"] = torch.from_numpy(counts.astype(np.int64))
            ids_prev = ids
        return cls(vocab_size, max_order, arrays, tokenizer)

    # -- files ---------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        """Write ``ngram.safetensors`` and ``ngram.json`` into ``out_dir``; returns the folder."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.arrays.items()}, str(out / FILE))
        meta = {
            "format": "decodekit-ngram-1",
            "vocab_size": self.vocab_size,
            "max_order": self.max_order,
            "tokenizer": self.tokenizer,
        }
        (out / META).write_text(json.dumps(meta, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path) -> NGramModel:
        """Load a model written by `save` (the folder, or its ``ngram.safetensors``)."""
        from safetensors.torch import load_file

        folder = Path(path)
        if folder.is_file():
            folder = folder.parent
        if not (folder / FILE).is_file() or not (folder / META).is_file():
            raise FileNotFoundError(
                f"no n-gram model at {str(path)!r} (expected {FILE} and {META}); build one with "
                "`decodekit ngram build CORPUS --tokenizer MODEL --out DIR`."
            )
        meta = json.loads((folder / META).read_text())
        return cls(
            meta["vocab_size"],
            meta["max_order"],
            load_file(str(folder / FILE)),
            meta.get("tokenizer"),
        )

    # -- look-ups ---------------------------------------------------------------------------
    def order_probs(
        self,
        contexts: torch.Tensor,
        candidates: torch.Tensor,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-order probabilities of ``candidates`` after each row of ``contexts``.

        Args:
            contexts: (R, L) token ids; the last column is the most recent token.
            candidates: (R, C) next-token ids to score.
            lengths: (R,) how many of the last tokens of each row are real (the rest is
                padding and never used as context); all L when None.

        Returns:
            probs: (R, max_order - 1, C) float64, ``P_n(candidate | context)`` for n = 2..max_order
                (0 where the context was not seen);
            seen: (R, max_order - 1) bool, whether the order-n context occurs in the corpus.
        """
        ctx, cand, lens = self._as_numpy(contexts, candidates, lengths)
        probs = np.zeros((ctx.shape[0], self.max_order - 1, cand.shape[1]), dtype=np.float64)
        seen = np.zeros((ctx.shape[0], self.max_order - 1), dtype=bool)
        for m, p, found in self._orders(ctx, cand, lens, self.max_order - 1):
            probs[:, m - 1], seen[:, m - 1] = p, found
        return torch.from_numpy(probs), torch.from_numpy(seen)

    def interpolate(
        self,
        contexts: torch.Tensor,
        candidates: torch.Tensor,
        weights: Sequence[float],
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``Σ_n w_n P_n(candidate | context)`` over the orders whose context was seen: (R, C) float64.

        ``weights[i]`` is the weight of order ``i + 2`` (bigram first); orders past
        ``len(weights)`` or past this model's ``max_order`` are not used.
        """
        ctx, cand, lens = self._as_numpy(contexts, candidates, lengths)
        orders = min(len(weights), self.max_order - 1)
        small = self._small_tables(tuple(float(w) for w in weights[:orders]))
        if small is not None:
            return torch.from_numpy(self._small_mixed(small, ctx, cand, lens))
        mixed = np.zeros(cand.shape, dtype=np.float64)
        for m, p, _ in self._orders(ctx, cand, lens, orders):
            mixed += weights[m - 1] * p  # p is 0 on rows whose context was not seen
        return torch.from_numpy(mixed)

    # numpy, not torch, below: a decoding step makes a few dozen operations on arrays of a
    # few dozen entries, where torch's per-call overhead would dominate
    @staticmethod
    def _as_numpy(contexts, candidates, lengths) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ctx = contexts.detach().cpu().numpy().astype(np.int64, copy=False)
        cand = candidates.detach().cpu().numpy().astype(np.int64, copy=False)
        if lengths is None:
            return ctx, cand, np.full(ctx.shape[0], ctx.shape[1], dtype=np.int64)
        return ctx, cand, lengths.detach().cpu().numpy().astype(np.int64, copy=False)

    def _orders(self, ctx: np.ndarray, cand: np.ndarray, lens: np.ndarray, orders: int):
        """Yield ``(m, P(cand | last m tokens) (R, C), context seen (R,))`` for m = 1..orders.

        Stops early once no row's context of length m was seen (no longer one can be).
        """
        rows, width = ctx.shape
        V = self.vocab_size
        found = np.ones(rows, dtype=bool)
        ids = np.zeros(rows, dtype=np.int64)
        in_vocab = (cand >= 0) & (cand < V)
        cand = np.minimum(
            cand, V - 1
        )  # out-of-vocabulary candidates (masked by in_vocab) stay in range
        for m in range(1, min(orders, width) + 1):
            keys, totals, pair_keys, pair_counts = self._numpy[m]
            back = ctx[:, width - m]
            found &= (lens >= m) & (back >= 0) & (back < V)
            if keys.size == 0 or not found.any():
                return
            key = back if m == 1 else ids * V + back
            at = np.minimum(keys.searchsorted(key), keys.size - 1)
            found &= keys[at] == key
            ids = np.where(found, at, 0)
            dense = self._dense_counts(m)
            if dense is not None:  # one gather; a pair never seen has count 0
                counts = dense[ids[:, None], cand]  # (R, C)
                hit = in_vocab & found[:, None]
            else:
                pair = ids[:, None] * V + cand  # (R, C)
                pat = np.minimum(pair_keys.searchsorted(pair), pair_keys.size - 1)
                hit = (pair_keys[pat] == pair) & in_vocab & found[:, None]
                counts = pair_counts[pat]
            yield m, np.where(hit, counts, 0) / np.maximum(totals[ids], 1)[:, None], found.copy()

    # For small vocabularies (every order dense) the look-up is a few whole-array gathers:
    # per order, a transition table takes (context id of the last m-1 tokens, token m back)
    # to the id of the last m tokens, and one stacked table holds every order's weighted
    # probabilities. About a dozen numpy calls a step, whatever the number of rows, instead
    # of about ten per order.
    def _small_tables(self, weights: tuple[float, ...]):
        """``(transitions, table, offsets)`` for these order weights, or None when an order is
        not dense.

        ``transitions[m - 1]`` is ``(contexts of order m-1 + 1, V + 1)``: entry ``[i, t]`` is
        the id of the order-m context "t, then context i" (order 1: row 0 is the empty
        context), and the last row and column (unseen context, token outside the
        vocabulary) lead to the unseen id ``contexts of order m``. ``table`` stacks, per
        order m from ``offsets[m - 1]`` on, ``w_m · P_m(t | context)`` for every context plus
        a zero row (unseen), with a zero last column (a candidate outside the vocabulary).
        """
        cache = self._small_cache
        if weights not in cache:
            orders, V = len(weights), self.vocab_size
            dense = all(self._dense_counts(m) is not None for m in range(1, orders + 1))
            cells = sum(self._numpy[m][0].size + 1 for m in range(1, orders + 1)) * (V + 1)
            if not dense or cells > STACKED_LIMIT:
                cache[weights] = None
                return None
            transitions, tables, offsets, start, previous = [], [], [], 0, 1
            for m, w in enumerate(weights, start=1):
                keys, totals = self._numpy[m][0], self._numpy[m][1]
                step = np.full((previous + 1, V + 1), keys.size, dtype=np.int64)
                step[keys // V if m > 1 else 0, keys % V if m > 1 else keys] = np.arange(keys.size)
                transitions.append(step)
                weighted = np.zeros((keys.size + 1, V + 1))
                weighted[: keys.size, :V] = w * (
                    self._dense_counts(m) / np.maximum(totals, 1)[:, None]
                )
                tables.append(weighted)  # the division as in _orders, then the weight
                offsets.append(start)
                start += keys.size + 1
                previous = keys.size
            cache[weights] = (transitions, np.concatenate(tables), np.asarray(offsets))
        return cache[weights]

    def _small_mixed(
        self, small, ctx: np.ndarray, cand: np.ndarray, lens: np.ndarray
    ) -> np.ndarray:
        """``Σ_m w_m P_m(cand | last m tokens)`` (R, C) from the tables of `_small_tables`."""
        transitions, table, offsets = small
        orders, V, (rows, width) = len(transitions), self.vocab_size, ctx.shape
        depth = min(orders, width)
        back = np.full((rows, orders), V, dtype=np.uint64)  # token m back; V: none or invalid
        back[:, :depth] = ctx[:, ::-1][:, :depth]  # a negative id wraps to a huge one
        back = np.minimum(back, V).astype(np.int64)
        back[np.arange(orders)[None, :] >= lens[:, None]] = V  # padding is never context
        ident = np.zeros(rows, dtype=np.int64)
        index = np.empty((rows, orders), dtype=np.int64)
        for m in range(orders):
            ident = transitions[m][ident, back[:, m]]  # unseen stays unseen
            index[:, m] = ident
        index += offsets
        column = np.minimum(cand.astype(np.uint64), V).astype(np.int64)  # outside: zero column
        # summed over orders in order, first to last: the same float64 sums as the loop over _orders
        return table[index[:, :, None], column[:, None, :]].sum(axis=1)

    def _dense_counts(self, m: int) -> np.ndarray | None:
        """Order ``m``'s pair counts as a ``(contexts, V)`` int32 table, or None when too large."""
        if m not in self._dense:
            keys, _, pair_keys, pair_counts = self._numpy[m]
            cells = keys.size * self.vocab_size
            if cells > DENSE_LIMIT or (pair_counts.size and pair_counts.max() >= 2**31):
                self._dense[m] = None
            else:
                table = np.zeros((keys.size, self.vocab_size), dtype=np.int32)
                table[pair_keys // self.vocab_size, pair_keys % self.vocab_size] = pair_counts
                self._dense[m] = table
        return self._dense[m]

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{m + 1}-grams: {self.arrays[f'pair_keys.{m}'].numel()}"
            for m in range(1, self.max_order)
        )
        return f"NGramModel(vocab_size={self.vocab_size}, {sizes})"


# -- building from text ----------------------------------------------------------------------
def _read_corpus(corpus: Path) -> list[str]:
    files = sorted(corpus.rglob("*.txt")) if corpus.is_dir() else [corpus]
    if not files:
        raise FileNotFoundError(f"no .txt files under {corpus}")
    lines: list[str] = []
    for f in files:
        lines.extend(line for line in f.read_text().splitlines() if line.strip())
    return lines


def build_from_texts(
    texts: Iterable[str],
    tokenizer,
    max_order: int = 6,
    append_eos: bool = True,
    name: str | None = None,
) -> NGramModel:
    """Tokenize each text (one sequence each, EOS appended when the tokenizer has one) and count."""
    eos = getattr(tokenizer, "eos_token_id", None)
    seqs = []
    for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]:
        if append_eos and eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        seqs.append(ids)
    vocab = max(len(tokenizer), max((max(s) for s in seqs if s), default=0) + 1)
    return NGramModel.build(seqs, vocab, max_order=max_order, tokenizer=name)


def ngram_cli(argv: list[str]) -> int:
    """``decodekit ngram build CORPUS --tokenizer MODEL --out DIR``: build and save an n-gram model."""
    parser = argparse.ArgumentParser(
        prog="decodekit ngram", description="Token n-gram models for superposed decoding."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="count n-grams of a text corpus with a model's tokenizer")
    b.add_argument(
        "corpus", type=Path, help="a text file (one document per line) or a folder of .txt files"
    )
    b.add_argument(
        "--tokenizer", required=True, help="a tokenizer folder, zoo:<name> or a cached hub id"
    )
    b.add_argument(
        "--out", required=True, type=Path, help="folder to write ngram.safetensors + ngram.json"
    )
    b.add_argument("--max-order", type=int, default=6, help="highest n (default 6)")
    b.add_argument("--no-eos", action="store_true", help="do not append EOS to each document")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    if not args.corpus.exists():
        parser.error(f"corpus {str(args.corpus)!r} does not exist")
    if args.max_order < 2:
        parser.error("--max-order must be at least 2")
    from decodekit.config import resolve_model

    source = resolve_model(args.tokenizer, path="--tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as e:
        parser.error(f"cannot load a tokenizer from {args.tokenizer!r}: {e}")
    texts = _read_corpus(args.corpus)
    model = build_from_texts(
        texts, tokenizer, max_order=args.max_order, append_eos=not args.no_eos, name=args.tokenizer
    )
    model.save(args.out)
    print(f"{model!r} from {len(texts)} documents -> {args.out}")
    return 0
