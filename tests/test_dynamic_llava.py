"""dynamic-llava: keep 1.0 changes nothing, the kept set is the predictor's top share per row, batch
rows equal rows alone, predictor files round-trip, training moves the keep rate to its target."""

from __future__ import annotations

import functools
import json
import math
import tempfile

import decodekit
import numpy as np
import pytest
import torch
from decodekit.cli import main
from decodekit.pipelines.vlm_adapter import VLMPipeline
from decodekit.pipelines.zoo.shapes_vqa import vqa_items
from decodekit.plugins.dynamic_llava import DynamicLLaVA
from decodekit.predictor_training import train_predictors
from decodekit.predictors import (
    PredictorConfig,
    Predictors,
    gumbel_keep,
    load_predictors,
    save_predictors,
)
from decodekit.testing import StrategyTesterMixin, tiny_llava

from tests.tiny import VLM_IMAGE_ID as IMAGE
from tests.tiny import vlm_enc as _enc
from tests.tiny import vlm_generate as _generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: a second thread only waits


@functools.cache
def _predictor_folder(seed: int = 0, hidden: int = 32, layer: int = 2) -> str:
    """A randomly initialised predictor pair for tiny_llava, written once per session."""
    torch.manual_seed(seed)
    cfg = PredictorConfig(hidden_size=hidden, layer=layer, d_model=16, heads=2, ffn=32)
    return str(save_predictors(Predictors(cfg), tempfile.mkdtemp(prefix="dk-predictor-")))


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=1)


def test_keep_ratio_one_identical_tokens(llava):
    model, processor = llava
    enc = _enc(processor, [0, 1])
    base, base_logits = _generate(model, enc)
    settings = [
        {"keep_ratio": 1.0},  # the L2-norm fallback
        {"keep_ratio": 1.0, "predictor": _predictor_folder(), "decode_admission": False},
        # every decoded token admitted: the text predictor runs, nothing is dropped
        {"keep_ratio": 1.0, "predictor": _predictor_folder(), "text_threshold": 0.0},
    ]
    for params in settings:
        with decodekit.attach(model, [DynamicLLaVA(**params)]) as run:
            tokens, logits = _generate(model, enc)
            stats = run.strategies[0].stats()
        assert torch.equal(tokens, base), params
        torch.testing.assert_close(logits, base_logits, atol=1e-5, rtol=1e-5)
        assert stats["image_tokens_kept"] == stats["image_tokens"] == 32
        assert stats["prefill_flops_ratio"] == 1.0


def _layer_input(model, enc, layer):
    with torch.no_grad():
        return model(**enc, output_hidden_states=True).hidden_states[layer]  # (B, L, D)


def test_kept_set_is_the_predictors_top_share_per_row(llava):
    model, processor = llava
    enc = _enc(processor, [0, 1])
    folder = _predictor_folder()
    with decodekit.attach(
        model, [DynamicLLaVA(keep_ratio=0.25, predictor=folder, decode_admission=False)]
    ) as run:
        _generate(model, enc, n=2)
        keep = run.strategies[0].pruner.keep
        stats = run.strategies[0].stats()
    hidden = _layer_input(model, enc, 2)  # the input of layer K = 2, unpruned
    predictors = load_predictors(folder)
    image = enc["input_ids"] == IMAGE
    kept_images = []
    for b in range(2):
        pos = image[b].nonzero().flatten()
        with torch.no_grad():
            scores = predictors.image_scores(hidden[b, pos][None])[0]
        top = pos[scores.topk(4).indices]  # 25% of 16 image tokens
        expect = torch.cat([(~image[b]).nonzero().flatten(), top]).sort().values
        assert torch.equal(keep[b], expect)
        kept_images.append((top - pos[0]).sort().values)
    assert not torch.equal(kept_images[0], kept_images[1])  # each row its own set
    assert stats["image_tokens"] == 32 and stats["image_tokens_kept"] == 8
    assert stats["scorer"] == "predictor" and stats["prefill_flops_ratio"] < 1.0


def test_fallback_ranks_by_hidden_state_norm(llava):
    model, processor = llava
    enc = _enc(processor, [0, 2])
    with decodekit.attach(model, [DynamicLLaVA(keep_ratio=0.5)]) as run:
        _generate(model, enc, n=1)
        keep = run.strategies[0].pruner.keep
        assert run.strategies[0].stats()["scorer"] == "l2-norm"
    hidden = _layer_input(model, enc, 2)
    image = enc["input_ids"] == IMAGE
    for b in range(2):
        pos = image[b].nonzero().flatten()
        top = pos[hidden[b, pos].norm(dim=-1).topk(8).indices]
        assert set(keep[b].tolist()) & set(pos.tolist()) == set(top.tolist())


@pytest.mark.parametrize("admission", [False, True])
def test_batch_rows_equal_rows_alone(llava, admission):
    model, processor = llava
    params = dict(keep_ratio=0.25, predictor=_predictor_folder(), decode_admission=admission)
    with decodekit.attach(model, [DynamicLLaVA(**params)]):
        batch, batch_logits = _generate(model, _enc(processor, [0, 1, 2]))
        for b in range(3):
            alone, alone_logits = _generate(model, _enc(processor, [b]))
            assert torch.equal(alone[0], batch[b])
            torch.testing.assert_close(alone_logits[0], batch_logits[b], atol=1e-5, rtol=1e-5)


def test_decode_admission(llava):
    """Off equals prefill-only pruning (= admitting every token); dropping every token changes the
    output; the admitted counts are the text predictor's decisions."""
    model, processor = llava
    enc = _enc(processor, [0, 1])
    folder = _predictor_folder()
    runs = {}
    for name, params in {
        "off": dict(decode_admission=False),
        "all": dict(text_threshold=0.0),
        "none": dict(text_threshold=1.0),
        "half": dict(text_threshold=0.5),
    }.items():
        with decodekit.attach(
            model, [DynamicLLaVA(keep_ratio=0.25, predictor=folder, **params)]
        ) as run:
            runs[name] = (*_generate(model, enc, n=6), run.strategies[0].stats())
    off, all_, none, half = (runs[k] for k in ("off", "all", "none", "half"))
    assert torch.equal(off[0], all_[0])
    torch.testing.assert_close(off[1], all_[1], atol=1e-5, rtol=1e-5)
    assert off[2]["decode_tokens"] == 0
    assert all_[2]["decode_tokens"] == all_[2]["decode_tokens_admitted"] > 0
    assert none[2]["decode_tokens_admitted"] == 0 < none[2]["decode_tokens"]
    # the pruner's cache counts, read after detach: fewer slots than an unpruned cache
    cache = none[2]["cache"]
    assert cache["decoded"] == none[2]["decode_tokens"] and cache["admitted"] == 0
    assert 0 < cache["kv_slots"] < cache["kv_slots_full"]
    assert not torch.allclose(none[1], off[1], atol=1e-4)
    # the admitted tokens are those whose keep probability is above one half: layers < K cache
    # everything, so a decoded token's input to layer K is the unpruned model's at its position
    tokens = half[0]
    seq = torch.cat([enc["input_ids"], tokens], 1)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(tokens)], 1)
    with torch.no_grad():
        hidden = model(
            input_ids=seq,
            attention_mask=mask,
            pixel_values=enc["pixel_values"],
            output_hidden_states=True,
        ).hidden_states[2]
    fed = hidden[:, enc["input_ids"].shape[1] : -1]  # the decode steps' inputs (B, n - 1, D)
    with torch.no_grad():
        expect = int((load_predictors(folder).text_keep_probability(fed) > 0.5).sum())
    assert half[2]["decode_tokens"] == fed.shape[0] * fed.shape[1]
    assert half[2]["decode_tokens_admitted"] == expect


def test_predictor_files_round_trip(tmp_path):
    torch.manual_seed(3)
    cfg = PredictorConfig(hidden_size=24, layer=3, d_model=16, heads=4, ffn=40, layers=1)
    p = Predictors(cfg).eval()
    save_predictors(p, tmp_path / "pred")
    q = load_predictors(tmp_path / "pred")
    assert q.config == cfg
    for (k, a), (k2, b) in zip(p.state_dict().items(), q.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(2, 9, 24)
    with torch.no_grad():
        assert torch.equal(p.image_scores(x), q.image_scores(x))
        assert torch.equal(p.text_keep_probability(x), q.text_keep_probability(x))
    assert json.loads((tmp_path / "pred" / "predictor.json").read_text())["d_model"] == 16


def test_gumbel_decisions_are_hard_with_straight_through_gradients():
    logits = torch.randn(4, 50, 2, requires_grad=True)
    d = gumbel_keep(logits, tau=0.5, generator=torch.Generator().manual_seed(0))
    assert set(d.detach().unique().tolist()) <= {0.0, 1.0}
    d.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # hard decisions follow the keep probability: strongly "keep" logits keep almost always
    sure = torch.tensor([[4.0, -4.0]]).expand(1000, 2)
    assert gumbel_keep(sure, 1.0, torch.Generator().manual_seed(1)).mean() > 0.95


def _vqa_format():
    return dict(prompt_of=lambda it: f"<image> {it.question}", answer_of=lambda it: f" {it.answer}")


def test_fast_training_attention_equals_the_papers_form(llava):
    """The sdpa form of the masked attention gives the paper's logits at the answer rows; the
    straight-through gradients differ by each token's own-column term (the paper always keeps a
    token's own column, so its decision gets no gradient from its own row) but agree closely."""
    from decodekit.predictor_training import DecisionMasking

    model, processor = llava
    enc = _enc(processor, [0, 1])
    B, L = enc["input_ids"].shape
    hard = (torch.rand(B, L, generator=torch.Generator().manual_seed(0)) > 0.4).float()
    hard[:, -3:] = torch.tensor([1.0, 0.0, 0.0])  # the tail: a kept row and two dropped ones
    results = []
    for tail in (3, L):  # 3: fast form outside the last 3 rows; L: the paper's form everywhere
        soft = torch.full((B, L), 0.5, requires_grad=True)

        def decide(hidden, soft=soft):
            return hard + soft - soft.detach()

        with DecisionMasking(model, 2, decide) as masking:
            masking.exact_tail = tail
            logits = model(**enc).logits[:, -3:]
        logits.square().sum().backward()
        results.append((logits.detach(), soft.grad))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-4)
    fast, paper = results[0][1].flatten(), results[1][1].flatten()
    assert paper.abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(fast, paper, dim=0) > 0.9
    assert decodekit.compat.attn_implementation(model.model.language_model) == "sdpa"


def test_training_moves_the_keep_rate_to_its_target(llava):
    """Same data, seed and initial predictors: target 0.2 ends low, the control at 0.8 ends high,
    for both predictors; the VLM's weights and requires_grad flags are untouched."""
    model, processor = llava
    items = vqa_items(24, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    rates, text_rates = {}, {}
    for target in (0.2, 0.8):
        predictors, record = train_predictors(
            model,
            processor,
            items,
            **_vqa_format(),
            image_keep_ratio=target,
            text_keep_ratio=target,
            steps=40,
            batch_size=4,
            lr=3e-3,
            d_model=16,
            heads=2,
            seed=0,
        )
        rates[target] = np.mean([r["image_keep"] for r in record["history"][-8:]])
        text_rates[target] = np.mean([r["text_keep"] for r in record["history"][-8:]])
        assert abs(rates[target] - target) < 0.1  # the last steps keep about the target share
        assert record["recipe"]["vlm"] == "frozen" and len(record["history"]) == 40
        # the trained predictor keeps about the target share where its probability decides
        image = torch.randn(64, 16, 32)
        with torch.no_grad():
            p_keep = predictors.image(image).softmax(-1)[..., 0]
        assert p_keep.shape == (64, 16)
    assert rates[0.2] < 0.35 and rates[0.8] > 0.65
    assert text_rates[0.2] < 0.4 and text_rates[0.8] > 0.6  # the output-text predictor too
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert flags == [p.requires_grad for p in model.parameters()]
    assert decodekit.compat.attn_implementation(model.model.language_model) == "sdpa"


def test_bad_params_predictors_and_models(llava, tmp_path):
    model, _ = llava
    with pytest.raises(decodekit.ConfigError, match="keep_ratio"):
        DynamicLLaVA(keep_ratio=0.0)
    with pytest.raises(decodekit.ConfigError, match="text_threshold"):
        DynamicLLaVA(text_threshold=1.5)
    with pytest.raises(decodekit.ConfigError, match="no predictor folder"):
        decodekit.attach(model, [DynamicLLaVA(predictor=str(tmp_path / "nowhere"))])
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        decodekit.ConfigError, match=r"lacks predictor\.json, predictor\.safetensors"
    ):
        decodekit.attach(model, [DynamicLLaVA(predictor=str(tmp_path / "empty"))])
    wide = _predictor_folder(hidden=48)
    with pytest.raises(decodekit.ConfigError, match="width 48.*are 32"):
        decodekit.attach(model, [DynamicLLaVA(predictor=wide)])
    with pytest.raises(decodekit.ConfigError, match="trained on layer 2's input, not layer 1's"):
        decodekit.attach(model, [DynamicLLaVA(predictor=_predictor_folder(), layer=1)])
    broken = tmp_path / "broken"
    save_predictors(Predictors(PredictorConfig(hidden_size=32, d_model=16, heads=2)), broken)
    cfg = json.loads((broken / "predictor.json").read_text())
    (broken / "predictor.json").write_text(json.dumps({**cfg, "d_model": 32}))
    with pytest.raises(decodekit.ConfigError, match="does not match|has shape"):
        decodekit.attach(model, [DynamicLLaVA(predictor=str(broken))])
    (broken / "predictor.json").write_text("{not json")
    with pytest.raises(decodekit.ConfigError, match="not readable JSON"):
        decodekit.attach(model, [DynamicLLaVA(predictor=str(broken))])
    with pytest.raises(decodekit.AttachError, match="below the language model's 4 layers"):
        decodekit.attach(model, [DynamicLLaVA(layer=4)])
    from decodekit.testing import tiny_llama

    with pytest.raises(decodekit.AttachError, match="image_token_id"):
        decodekit.attach(tiny_llama(), [DynamicLLaVA()])
    # a failed attach leaves the model as it was
    assert decodekit.compat.attn_implementation(model.model.language_model) == "sdpa"


def test_fastv_and_dynamic_llava_share_the_context_slot(llava):
    from decodekit.plugins.fastv import FastV

    model, _ = llava
    with pytest.raises(decodekit.DecodekitError, match="context"):
        decodekit.attach(model, [DynamicLLaVA(), FastV()])


# -- the command ----------------------------------------------------------------------------
def test_train_predictor_command_writes_a_loadable_predictor(tmp_path, capsys):
    from decodekit.pipelines.zoo.train_shapes_vlm import new_model, shapes_vlm_processor

    # the zoo model's format (its image tokens and vocabulary) at a tiny size
    model = new_model(seed=0, vision_width=16, text_width=32, text_layers=3, text_intermediate=32)
    model.save_pretrained(tmp_path / "vlm")
    shapes_vlm_processor().save_pretrained(tmp_path / "vlm")
    argv = ["train-predictor", str(tmp_path / "vlm"), "--out", str(tmp_path / "p")]
    argv += ["--steps", "2", "--batch-size", "2", "--items", "6", "--d-model", "16", "--heads", "2"]
    argv += ["--eval-items", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "predictor: accuracy" in out
    predictors = load_predictors(tmp_path / "p")
    assert predictors.config.hidden_size == 32 and predictors.config.layer == 2
    record = json.loads((tmp_path / "p" / "training.json").read_text())
    assert len(record["history"]) == 2 and record["data"]["source"] == "shapes-vqa"
    ev = record["evaluation"]
    n = model.config.image_seq_length  # image tokens per question
    assert ev["predictor"]["stats"]["image_tokens"] == 3 * n
    assert ev["predictor"]["stats"]["image_tokens_kept"] == 3 * math.ceil(0.2 * n)
    assert ev["l2-norm"]["stats"]["scorer"] == "l2-norm" and ev["baseline"]["count"] == 3


def test_train_predictor_command_errors(tmp_path, capsys):
    model, processor = tiny_llava(seed=0)
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    assert main(["train-predictor", str(tmp_path / "vlm"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "only built-in data is the zoo's shapes-vqa" in err and "purple" in err
    assert main(["train-predictor", str(tmp_path / "missing")]) == 2
    assert "no model folder" in capsys.readouterr().err
    assert main(["train-predictor", str(tmp_path / "vlm"), "--keep-ratio", "0"]) == 2
    assert "--keep-ratio" in capsys.readouterr().err


class TestDynamicLLaVAContract(StrategyTesterMixin):
    strategies = [{"name": "dynamic-llava", "params": {"keep_ratio": 0.5}}]

    def make_pipeline(self):
        pipe = VLMPipeline(*tiny_llava(seed=2))
        # transformers installs its output-capturing hooks on the vision tower at the first
        # forward (an attribute left behind): run one before any fingerprint is taken
        _generate(pipe.model, _enc(pipe.processor, [0]), n=1)
        return pipe

    def sample_inputs(self):
        return [0, 1, 2]

    def run_pipeline(self, pipe, inputs, seed, row_offset=0):
        torch.manual_seed(seed)
        return _generate(pipe.model, _enc(pipe.processor, inputs), n=4)[1]

    def broken_call(self, pipe):
        pipe.model.generate(**_enc(pipe.processor, [0]), max_new_tokens=2, num_beams=0)


class TestDynamicLLaVAPredictorContract(TestDynamicLLaVAContract):
    """The same contract with a predictor (and decode admission where the pruner has it)."""

    def attach(self, pipe):
        return decodekit.attach(
            pipe,
            [
                {
                    "name": "dynamic-llava",
                    "params": {"keep_ratio": 0.5, "predictor": _predictor_folder()},
                }
            ],
        )

    @property
    def strategies(self):
        return [
            {
                "name": "dynamic-llava",
                "params": {"keep_ratio": 0.5, "predictor": _predictor_folder()},
            }
        ]


# -- the zoo's predictor -----------------------------------------------------------------------
def _zoo_folder():
    from decodekit.pipelines import zoo

    folder = zoo.zoo_path("shapes-vlm")
    return folder if (folder / "model.safetensors").is_file() else None


@pytest.mark.skipif(_zoo_folder() is None, reason="zoo:shapes-vlm is not in this checkout")
def test_zoo_predictor_keeps_a_quarter_and_answers():
    """zoo:shapes-vlm's committed predictor fits its model and, keeping 64 of 256 image tokens,
    answers held-out gate questions (seed 2) at the model's gate level."""
    from decodekit.pipelines.zoo.shapes_vqa import accuracy
    from decodekit.pipelines.zoo.train_shapes_vlm import generate_answers
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = _zoo_folder()
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    items = vqa_items(24, seed=2, split="gate")
    params = {"keep_ratio": 0.25, "predictor": "zoo:shapes-vlm"}
    with decodekit.attach(model, [DynamicLLaVA(**params)]) as run:
        texts = generate_answers(model, processor, items)
        stats = run.strategies[0].stats()
    assert (
        stats["scorer"] == "predictor" and stats["image_tokens_kept"] * 4 == stats["image_tokens"]
    )
    assert accuracy(texts, items)["overall"] >= 0.9
