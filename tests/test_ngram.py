"""The n-gram model of superposed decoding: counts, interpolation by hand, safetensors round trip, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from decodekit.plugins.ngram import NGramModel, build_from_texts, ngram_cli

# Two toy documents over a vocabulary of 8.
DOCS = [[1, 2, 3, 1, 2, 4], [5, 1, 2, 3]]


@pytest.fixture(scope="module")
def toy():
    return NGramModel.build(DOCS, vocab_size=8, max_order=4)


def test_counts_by_hand(toy):
    # context (2,): followed by 3, 4, 3  -> P2(3|2) = 2/3, P2(4|2) = 1/3
    # context (1,2): followed by 3, 4, 3 -> same; context (3,1,2): followed by 4 only
    # context (5,1,2): followed by 3 only
    ctx = torch.tensor([[3, 1, 2], [5, 1, 2], [0, 0, 7]])
    cand = torch.tensor([[3, 4], [3, 4], [3, 4]])
    probs, seen = toy.order_probs(ctx, cand)
    want = torch.tensor(
        [
            [[2 / 3, 1 / 3], [2 / 3, 1 / 3], [0.0, 1.0]],
            [[2 / 3, 1 / 3], [2 / 3, 1 / 3], [1.0, 0.0]],
            [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(probs, want)
    assert seen.tolist() == [[True, True, True], [True, True, True], [False, False, False]]


def test_contexts_never_span_documents(toy):
    # "4 5" only occurs across the document boundary: not a bigram
    probs, seen = toy.order_probs(torch.tensor([[4]]), torch.tensor([[5]]))
    assert not seen[0, 0] and probs[0, 0, 0] == 0


def test_interpolation_by_hand(toy):
    w = [0.1, 0.3, 0.6]
    ctx = torch.tensor([[3, 1, 2], [9 % 8, 1, 2]])  # second row: (1,1,2) unseen at order 4
    cand = torch.tensor([[4, 3], [4, 3]])
    got = toy.interpolate(ctx, cand, w)
    row0 = [0.1 * 1 / 3 + 0.3 * 1 / 3 + 0.6 * 1.0, 0.1 * 2 / 3 + 0.3 * 2 / 3 + 0.6 * 0.0]
    row1 = [0.1 * 1 / 3 + 0.3 * 1 / 3, 0.1 * 2 / 3 + 0.3 * 2 / 3]  # unseen order adds nothing
    torch.testing.assert_close(got, torch.tensor([row0, row1], dtype=torch.float64))


def test_lengths_limit_the_context(toy):
    ctx = torch.tensor([[3, 1, 2]])
    cand = torch.tensor([[4]])
    _, seen = toy.order_probs(ctx, cand, lengths=torch.tensor([2]))
    assert seen.tolist() == [[True, True, False]]  # the 3rd token back is padding


def test_dense_tables_equal_the_sorted_pair_search(monkeypatch):
    # Small vocabularies look pairs up in dense per-order tables; large ones search the
    # sorted pairs. Both must give the same numbers, unseen contexts and
    # out-of-vocabulary candidates included.
    import decodekit.plugins.ngram as ngram

    gen = torch.Generator().manual_seed(0)
    docs = [
        torch.randint(0, 12, (int(n),), generator=gen).tolist()
        for n in torch.randint(3, 40, (60,), generator=gen)
    ]
    ctx = torch.randint(-1, 12, (40, 7), generator=gen)
    cand = torch.randint(0, 14, (40, 5), generator=gen)  # 12, 13: out of vocabulary
    lens = torch.randint(0, 8, (40,), generator=gen)
    dense = NGramModel.build(docs, vocab_size=12, max_order=5)
    probs_d, seen_d = dense.order_probs(ctx, cand, lens)  # tables are built on first use
    monkeypatch.setattr(ngram, "DENSE_LIMIT", 0)
    sparse = NGramModel.build(docs, vocab_size=12, max_order=5)
    probs_s, seen_s = sparse.order_probs(ctx, cand, lens)
    assert all(t is not None for t in dense._dense.values()) and dense._dense
    assert all(t is None for t in sparse._dense.values()) and sparse._dense
    assert torch.equal(probs_d, probs_s) and torch.equal(seen_d, seen_s)
    assert seen_d.any() and (probs_d > 0).any() and not seen_d.all()
    w = [0.1, 0.2, 0.3, 0.4]
    # interpolate on small vocabularies takes the per-row dict path: the same sums, to the bit,
    # also on contexts cut from the corpus itself (seen at every order)
    seen_rows = torch.tensor([d[i : i + 7] for d in docs if len(d) >= 9 for i in (0, 2)][:30])
    ctx = torch.cat([ctx, seen_rows])
    cand = torch.cat([cand, torch.randint(0, 14, (seen_rows.shape[0], 5), generator=gen)])
    lens = torch.cat([lens, torch.full((seen_rows.shape[0],), 7)])
    assert dense._small_tables(tuple(w)) is not None and sparse._small_tables(tuple(w)) is None
    mixed = dense.interpolate(ctx, cand, w, lens)
    assert torch.equal(mixed, sparse.interpolate(ctx, cand, w, lens))
    assert dense.order_probs(ctx, cand, lens)[1][-30:].all()  # the corpus rows: every order seen
    assert (mixed[-30:] > 0).any() and (mixed == 0).any()
    # a stacked table over the size limit falls back to the per-order look-up
    monkeypatch.undo()  # dense tables again
    monkeypatch.setattr(ngram, "STACKED_LIMIT", 0)
    capped = NGramModel.build(docs, vocab_size=12, max_order=5)
    assert capped._small_tables(tuple(w)) is None and capped._dense_counts(1) is not None
    assert torch.equal(capped.interpolate(ctx, cand, w, lens), mixed)


def test_save_load_round_trip_is_safetensors(toy, tmp_path):
    toy.save(tmp_path)
    meta = json.loads((tmp_path / "ngram.json").read_text())
    assert meta["vocab_size"] == 8 and meta["max_order"] == 4
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ngram.safetensors"), "pt") as f:
        assert "pair_counts.3" in f.keys()
    back = NGramModel.load(tmp_path)
    ctx, cand = torch.tensor([[3, 1, 2]]), torch.tensor([[3, 4]])
    w = [1, 1, 1]
    torch.testing.assert_close(back.interpolate(ctx, cand, w), toy.interpolate(ctx, cand, w))


def test_load_missing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="decodekit ngram build"):
        NGramModel.load(tmp_path)


def test_out_of_vocabulary_ids_rejected():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        NGramModel.build([[1, 5]], vocab_size=4)


def _char_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    for ch in "0123456789+-= abc":
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    fast.save_pretrained(folder)
    return fast


def test_cli_builds_from_a_corpus(tmp_path):
    tok = _char_tokenizer(tmp_path / "tok")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("1+1=2\n1+2=3\n\n2+2=4\n")
    out = tmp_path / "ng"
    rc = ngram_cli(["build", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--out", str(out)])
    assert rc == 0
    model = NGramModel.load(tmp_path / "ng")
    ids = tok("1+2=")["input_ids"]
    three, eos = tok.convert_tokens_to_ids("3"), tok.eos_token_id
    probs, seen = model.order_probs(torch.tensor([ids]), torch.tensor([[three]]))
    # "=" -> 2, 3, 4; "2=" and "+2=" -> 3, 4; "1+2=" -> 3; no 5-token context (no BOS here)
    want = torch.tensor([1 / 3, 1 / 2, 1 / 2, 1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(probs[0, :, 0], want)
    assert seen[0].tolist() == [True, True, True, True, False]
    # EOS was appended to each document
    p_eos, _ = model.order_probs(torch.tensor([tok("1+2=3")["input_ids"]]), torch.tensor([[eos]]))
    assert p_eos[0, 0, 0] == 1.0
    assert build_from_texts(["1+1=2"], tok).vocab_size >= len(tok)


def test_cli_bad_input_exits_with_message(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ngram_cli(
            ["build", str(tmp_path / "missing.txt"), "--tokenizer", "x", "--out", str(tmp_path)]
        )
    assert "does not exist" in capsys.readouterr().err
