"""A CLIP BPE vocabulary (vocab.json + merges.txt) written for a closed set of words.

CLIP's byte-level BPE marks the end of a word with ``</w>``. For each word in turn we write
the merges that join what the earlier merges leave of it (``r e``, ``re d</w>``), so that
each caption word becomes a single token, and put the
special tokens at the end of the vocabulary as CLIP does (its text model pools at the
highest id when ``eos_token_id`` is the legacy 2).
"""

from __future__ import annotations

import json
from pathlib import Path

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Tokenize one word's pieces with ranked merges, as BPE does (lowest rank first)."""
    while len(pieces) > 1:
        pairs = [
            (ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))
        ]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def clip_vocabulary(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merge list that tokenize each of `words` to one token."""
    letters = sorted({c for w in words for c in w})
    tokens: list[str] = []
    for c in letters:
        tokens += [c, c + "</w>"]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # merges appended later rank lower, so they never change how earlier words split
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in tokens:
                tokens.append(pieces[0])
    tokens += [START_TOKEN, END_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_clip_tokenizer_files(folder: Path, words: list[str], max_length: int) -> None:
    """Write vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocabulary(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=1))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {
        "bos_token": START_TOKEN,
        "eos_token": END_TOKEN,
        "unk_token": END_TOKEN,
        "pad_token": END_TOKEN,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "do_lower_case": True,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
