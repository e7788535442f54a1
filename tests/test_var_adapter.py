"""The ``var`` adapter: the scale-autoregression contract, the model plan hook, YAML runs.

A strategy chooses which model runs which scale through
``decodekit_scale_models(run, plan)``; these tests check the loop's side of
that contract with a second model of the same weights (which must reproduce
the plain call, whatever scale it takes over at) and with other weights
(taking over at scale 0 is that model alone; at scale K, never, the plain
call), in float64.
"""

from __future__ import annotations

import copy

import decodekit
import pytest
import torch
from decodekit.errors import ConfigError
from decodekit.hookspecs import hookimpl
from decodekit.loops import AdapterView, ScaleAutoregressionAdapter, contract_of
from decodekit.pipelines.var import VARPipeline
from decodekit.pipelines.var_adapter import VARAdapter, VARInputs
from decodekit.pipelines.var_vq import MultiScaleVQConfig, MultiScaleVQVAE
from decodekit.session import attached_run
from decodekit.strategy import Strategy
from pydantic import ValidationError

CLASSES = ["a red circle", "a blue square", "a green triangle"]
KW = dict(cfg=2.0, top_k=6, top_p=0.9, temperature=1.2)


def tiny_pipe(seed: int = 0) -> VARPipeline:
    """A random VAR on a random VQ-VAE: scales 1, 2, 3 (6 x 6 images), 3 classes, float64."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vq = MultiScaleVQVAE(
            MultiScaleVQConfig(
                vocab_size=16,
                z_channels=4,
                ch=32,
                ch_mult=(1, 2),
                num_res_blocks=1,
                v_patch_nums=(1, 2, 3),
            )
        )
    pipe = VARPipeline.from_transformer(
        vq.double(),
        num_classes=3,
        depth=2,
        embed_dim=32,
        num_heads=4,
        class_names=CLASSES,
        seed=seed,
    )
    return pipe


@pytest.fixture(scope="module")
def pipe() -> VARPipeline:
    return tiny_pipe()


def gens(n: int = 3) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(10 + i) for i in range(n)]


class TwoModels(Strategy):
    """Runs ``other`` from scale ``switch`` on and records who ran each scale."""

    name = "test-two-models"
    loops = ("scale-autoregression",)

    def __init__(self, other, switch: int):
        super().__init__()
        self.other, self.switch, self.ran = other, switch, []

    @hookimpl
    def decodekit_scale_models(self, run, plan):
        plan.models[self.switch :] = [self.other] * (len(plan.models) - self.switch)

    @hookimpl
    def decodekit_scale_end(self, run, scale, model, tokens):
        self.ran.append((scale, model is self.other, tuple(tokens.shape)))


def test_attach_exposes_the_contract_and_detach_restores(pipe):
    forward = pipe.transformer.forward
    with decodekit.attach(pipe, []) as run:
        assert run.loop == "scale-autoregression" and isinstance(run.adapter, AdapterView)
        for name in contract_of(run.loop):
            getattr(run.adapter, name)
        assert run.adapter.transformer is pipe.transformer and run.adapter.vq is pipe.vq
        assert run.adapter.patch_nums == (1, 2, 3) and run.adapter.num_scales == 3
        out = pipe([0, 1], generator=gens(2), **KW)
        assert run.adapter.step == out.forwards == 3 and run.last["nfe"] == 3
        assert run.adapter.decoder is pipe.decoder
    assert attached_run(pipe) is None and pipe.transformer.forward == forward
    assert issubclass(VARAdapter, ScaleAutoregressionAdapter)


@pytest.mark.parametrize("switch", [0, 1, 2])
def test_a_model_with_the_same_weights_taking_over_reproduces_the_plain_call(pipe, switch):
    plain = pipe([0, 2, 1], generator=gens(), **KW)
    strategy = TwoModels(copy.deepcopy(pipe.transformer), switch)
    with decodekit.attach(pipe, [strategy]) as run:
        out = pipe([0, 2, 1], generator=gens(), **KW)
    for a, b in zip(plain.token_maps, out.token_maps):
        assert torch.equal(a, b)
    assert [(s, o) for s, o, _ in strategy.ran] == [(s, s >= switch) for s in range(3)]
    assert [shape for *_, shape in strategy.ran] == [(3, 1), (3, 4), (3, 9)]
    assert run.last["nfe"] == out.forwards == 3  # the hand-over is one prefill forward


def test_another_model_from_scale_0_is_that_model_alone_and_from_scale_k_never_runs(pipe):
    other = tiny_pipe(seed=1).transformer
    alone = VARPipeline(other, pipe.vq)([1, 1, 0], generator=gens(), **KW)
    plain = pipe([1, 1, 0], generator=gens(), **KW)
    for switch, want in ((0, alone), (3, plain)):
        with decodekit.attach(pipe, [TwoModels(other, switch)]):
            out = pipe([1, 1, 0], generator=gens(), **KW)
        for a, b in zip(want.token_maps, out.token_maps):
            assert torch.equal(a, b)
    with decodekit.attach(pipe, [TwoModels(other, 1)]):  # a real hand-over: a mixture
        mixed = pipe([1, 1, 0], generator=gens(), **KW)
    assert torch.equal(mixed.token_maps[0], plain.token_maps[0])
    assert mixed.stats["models"]["transformer"]["scales"] == 1


def test_a_plan_that_does_not_fit_is_refused_and_detaches(pipe):
    class Short(TwoModels):
        name = "test-short-plan"

        @hookimpl
        def decodekit_scale_models(self, run, plan):
            plan.models.pop()

    run = decodekit.attach(pipe, [Short(None, 0)])
    with pytest.raises(ValueError, match=r"left 2 models in plan.models; it needs one per scale"):
        pipe([0], temperature=0)
    assert not run.attached and attached_run(pipe) is None
    wrong = VARPipeline.from_transformer(
        tiny_pipe().vq, num_classes=4, depth=1, embed_dim=16, num_heads=2
    ).transformer.double()
    with decodekit.attach(pipe, [TwoModels(wrong, 1)]):
        with pytest.raises(ValueError, match=r"num_classes 4 \(the pipeline has 3\)"):
            pipe([0], temperature=0)


def test_adapter_loads_runs_saves_and_compares(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    loaded = VARAdapter.load(str(tmp_path / "m"), device="cpu", dtype="float64", options={})
    assert VARAdapter.matches(loaded) and not VARAdapter.matches(pipe.transformer)
    inputs = VARInputs(
        prompt=[CLASSES[0], 2, "a blue square"], cfg=1.5, top_k=5, seed=3, batch_size=2
    )
    assert inputs.prompt == [CLASSES[0], "class 2", CLASSES[1]]
    images = VARAdapter.generate(loaded, inputs)
    assert len(images) == 3 and images[0].size == (6, 6)
    # rows seeded from their prompt: the same prompt gives the same image anywhere in the list
    moved = VARAdapter.generate(loaded, inputs.model_copy(update={"prompt": inputs.prompt[::-1]}))
    assert VARAdapter.quality(images, moved[::-1]) == {"psnr": float("inf"), "identical": 1.0}
    files = VARAdapter.save(images, tmp_path / "out", inputs=inputs)
    assert [f.name for f in files][0] == "000-a-red-circle.png"
    assert [r["prompt"] for r in VARAdapter.records(images, inputs)] == inputs.prompt
    assert VARAdapter.picture(images, moved, tmp_path / "side.png")
    with pytest.raises(ConfigError, match="not a var folder"):
        VARAdapter.load(str(tmp_path), device="cpu", dtype="float64", options={})


@pytest.mark.parametrize(
    "bad",
    [
        {"cfg": -1},
        {"temperature": -1},
        {"temperature": [1.0, None]},
        {"top_k": 0},
        {"top_k": [2, 0]},
        {"top_p": 0.0},
        {"prompt": []},
        {"batch_size": 0},
        {"guidance_scale": 3},
        {"prompt": [True]},
    ],
)
def test_inputs_out_of_range_are_refused(bad):
    with pytest.raises(ValidationError):
        VARInputs(**{"prompt": [0], **bad})


def test_decodekit_run_and_bench_from_yaml(pipe, tmp_path, capsys):
    import json

    import yaml
    from decodekit.cli import main

    pipe.save_pretrained(tmp_path / "m")
    config = {
        "pipeline": {"type": "var", "model": str(tmp_path / "m"), "dtype": "float64"},
        "inputs": {"prompt": ["a blue square", 0], "cfg": 2.0, "top_k": [4, 6, 8], "seed": 1},
        "output": {"dir": str(tmp_path / "out")},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "c.yaml")]) == 0
    assert "model calls: 3" in capsys.readouterr().out  # one forward per scale, both rows at once
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert [o["file"] for o in run["outputs"]] == ["000-a-blue-square.png", "001-class-0.png"]
    assert main(["bench", str(tmp_path / "c.yaml"), "--repeat", "1"]) == 0
    assert "identical" in capsys.readouterr().out  # no strategy: the baseline's images again
