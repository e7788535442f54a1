"""`code` (CoDe): the drafter makes the first scales, the refiner the rest, on decodekit's VAR loop.

Oracles on tiny random VARs in float64 (scales 1, 2, 3, 4; 3 classes): a refiner
with the drafter's weights reproduces plain VAR bit for bit wherever it takes
over; ``draft_steps = K`` is the drafter alone and ``0`` the refiner alone; with
other weights, every scale is the argmax of its own model's teacher-forced
logits over the mixed token maps (so the refiner's prefill reads exactly the
drafter's maps); the FLOP-ideal speed-up equals torch's count of the forwards
the loop runs.
"""

from __future__ import annotations

import copy
import json

import decodekit
import pytest
import torch
import yaml
from decodekit.cli import main
from decodekit.errors import ConfigError, UnknownNameError
from decodekit.pipelines.var import VARPipeline, guidance_ramp
from decodekit.pipelines.var_vq import MultiScaleVQConfig, MultiScaleVQVAE
from decodekit.plugins.code import CoDe, plan_flops
from decodekit.session import attached_run
from decodekit.testing import StrategyTesterMixin
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

K = 4
CLASSES = ["a red circle", "a blue square", "a green triangle"]
SAMPLED = dict(cfg=2.0, top_k=8, top_p=0.9, temperature=1.3)


def tiny_vq(seed: int = 0, patch_nums=(1, 2, 3, 4), vocab: int = 16) -> MultiScaleVQVAE:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vq = MultiScaleVQVAE(
            MultiScaleVQConfig(
                vocab_size=vocab,
                z_channels=4,
                ch=32,
                ch_mult=(1, 2),
                num_res_blocks=1,
                v_patch_nums=tuple(patch_nums),
            )
        )
    return vq.double()


def tiny_var(vq, seed: int = 0, depth: int = 2, width: int = 32, classes: int = 3):
    """A random VAR transformer on ``vq``'s layout, float64."""
    return VARPipeline.from_transformer(
        vq, num_classes=classes, depth=depth, embed_dim=width, num_heads=4, seed=seed
    ).transformer


@pytest.fixture(scope="module")
def vq() -> MultiScaleVQVAE:
    return tiny_vq()


@pytest.fixture(scope="module")
def pipe(vq) -> VARPipeline:
    """The drafter's pipeline (depth 3, width 32)."""
    return VARPipeline(tiny_var(vq, depth=3), vq, CLASSES)


@pytest.fixture(scope="module")
def small(vq):
    """A refiner with other weights (depth 1, width 16)."""
    return tiny_var(vq, seed=1, depth=1, width=16)


def gens(seeds=(3, 4, 5)) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def code(refiner, draft_steps: int) -> dict:
    return {"name": "code", "params": {"refiner": refiner, "draft_steps": draft_steps}}


def assert_same_call(a, b) -> None:
    assert len(a.token_maps) == len(b.token_maps) == K
    for si, (x, y) in enumerate(zip(a.token_maps, b.token_maps)):
        assert torch.equal(x, y), f"scale {si} differs"
    assert torch.equal(a.f_hat, b.f_hat)
    if a.images is not None and b.images is not None:
        assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]


# -- exactness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "greedy"])
@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_a_refiner_with_the_drafters_weights_is_plain_var(pipe, sampled, cfg):
    kw = {**SAMPLED, "cfg": cfg} if sampled else {"cfg": cfg, "temperature": 0}
    plain = pipe([0, 2, 0], generator=gens() if sampled else None, **kw)
    twin = copy.deepcopy(pipe.transformer)  # another object: the hand-over really happens
    for n in range(1, K):  # every real hand-over (0 and K: the next test)
        kind = "pil" if n == 2 else "tokens"  # f_hat decides the image: decode one of them
        with decodekit.attach(pipe, [code(twin, n)]) as run:
            out = pipe([0, 2, 0], generator=gens() if sampled else None, output_type=kind, **kw)
        assert_same_call(plain, out)
        assert run.last["nfe"] == K  # the refiner's prefill is its entry forward
        models = out.stats["models"]
        refiner_key = [k for k in models if k != "transformer"]
        assert sum(v["prefills"] for v in models.values()) == 1
        assert models["transformer"]["scales"] == n
        assert [models[k]["scales"] for k in refiner_key] == [K - n]
    # sampling really uses the generators: other seeds, other maps
    if sampled:
        other = pipe([0, 2, 0], generator=gens((7, 8, 9)), **kw)
        assert not all(torch.equal(a, b) for a, b in zip(plain.token_maps, other.token_maps))


def test_draft_steps_k_is_the_drafter_alone_and_0_the_refiner_alone(pipe, vq, small):
    drafter = pipe([1, 0], generator=gens((3, 4)), **SAMPLED)
    refiner = VARPipeline(small, vq)([1, 0], generator=gens((3, 4)), **SAMPLED)
    for n, want in ((K, drafter), (0, refiner)):  # images compared too
        with decodekit.attach(pipe, [code(small, n)]) as run:
            out = pipe([1, 0], generator=gens((3, 4)), **SAMPLED)
        assert_same_call(want, out)
        assert list(run.strategies[0].stats()["models"]) == (["drafter"] if n else ["refiner"])
    with decodekit.attach(pipe, [code(small, 2)]):
        mixed = pipe([1, 0], generator=gens((3, 4)), **SAMPLED)
    assert all(torch.equal(a, b) for a, b in zip(mixed.token_maps[:2], drafter.token_maps[:2]))
    assert not torch.equal(mixed.token_maps[-1], drafter.token_maps[-1])


def guided_argmax(model, vq, labels: torch.Tensor, maps: list[torch.Tensor], cfg: float):
    """Per scale, the argmax of ``model``'s teacher-forced logits over ``maps``, guided as VAR guides."""
    inputs = vq.teacher_inputs(maps)  # (B, L - 1, Cvae)
    cond = model(labels, inputs)  # (B, L, V), block-causal
    uncond = model(torch.full_like(labels, model.config.num_classes), inputs)
    out = []
    for si, (b, e) in enumerate(model.begin_ends):
        t = guidance_ramp(cfg, si, K)
        out.append(((1 + t) * cond[:, b:e] - t * uncond[:, b:e]).argmax(-1))
    return out


@pytest.mark.parametrize("n", [1, 2, 3])
def test_each_scale_is_its_models_teacher_forced_argmax(pipe, vq, small, n):
    # the refiner's prefill over the drafter's maps gives the logits it would have had
    # running every scale itself on those maps: the refiner's scales are the argmax of
    # its teacher-forced logits over the mixed maps, the drafter's scales of the drafter's
    labels, cfg = torch.tensor([2, 1, 0]), 1.5
    with decodekit.attach(pipe, [code(small, n)]):
        out = pipe(labels.tolist(), cfg=cfg, temperature=0, output_type="tokens")
    want_d = guided_argmax(pipe.transformer, vq, labels, out.token_maps, cfg)
    want_r = guided_argmax(small, vq, labels, out.token_maps, cfg)
    for si, tokens in enumerate(out.token_maps):
        assert torch.equal(tokens, (want_d if si < n else want_r)[si]), f"scale {si}"
    assert not all(torch.equal(a, b) for a, b in zip(want_d[n:], want_r[n:]))


# -- stats and the FLOP-ideal speed-up ---------------------------------------------------------
SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v)
    )
}


def counted_flops(pipe, plan, labels, cfg) -> int:
    """Matmul FLOPs torch counts in the loop's own forwards for ``plan``."""
    decoder = pipe.decoder_for(labels, cfg=cfg, temperature=0)
    total = 0
    for model in plan:
        with FlopCounterMode(display=False, custom_mapping=SDPA) as counter:
            logits = decoder.logits(model)
        total += counter.get_total_flops()
        decoder.accept(*decoder.sample(logits))
    return total


@pytest.mark.parametrize("n", [0, 1, 3])
def test_ideal_speedup_is_the_flop_ratio_of_the_forwards_the_loop_runs(pipe, small, n):
    plan = [pipe.transformer] * n + [small] * (K - n)
    rows = 2 * 2  # two labels, doubled by guidance
    assert counted_flops(pipe, plan, [0, 1], 2.0) == rows * plan_flops(plan)
    base = counted_flops(pipe, [pipe.transformer] * K, [0, 1], 2.0)
    with decodekit.attach(pipe, [code(small, n)]) as run:
        pipe([0, 1], cfg=2.0, temperature=0, output_type="tokens")
        assert run.ideal_speedup() == base / counted_flops(pipe, plan, [0, 1], 2.0) > 1


def test_stats_give_each_models_share(pipe, small):
    n = 2
    with decodekit.attach(pipe, [code(small, n)]) as run:
        pipe([0, 1, 2], cfg=2.0, temperature=0, output_type="tokens")
        stats = run.strategies[0].stats()
    drafter, refiner = stats["models"]["drafter"], stats["models"]["refiner"]
    assert stats["draft_steps"] == n
    assert (drafter["scales"], drafter["forwards"], drafter["prefill_tokens"]) == (n, n, 0)
    assert (refiner["scales"], refiner["forwards"]) == (K - n, K - n)
    assert refiner["prefill_tokens"] == 1 + 4  # scales 0 and 1, read in its entry forward
    # K/V: 2 (keys, values) x blocks x 6 rows x tokens seen x width x 8 bytes
    assert drafter["kv_bytes"] == 2 * 3 * 6 * (1 + 4) * 32 * 8
    assert refiner["kv_bytes"] == 2 * 1 * 6 * (1 + 4 + 9 + 16) * 16 * 8
    assert drafter["weight_bytes"] == 8 * sum(p.numel() for p in pipe.transformer.parameters())
    assert refiner["weight_bytes"] == 8 * sum(p.numel() for p in small.parameters())
    assert set(stats["seconds_s"]) == {"drafter", "refiner"}
    assert all(s > 0 for s in stats["seconds_s"].values())
    assert "cuda_allocated_bytes" not in drafter  # measured on CUDA only
    # the pipeline's own model as the refiner: nothing to hand over, no prefill
    with decodekit.attach(pipe, [code(pipe.transformer, n)]) as run:
        pipe([0, 1, 2], cfg=2.0, temperature=0, output_type="tokens")
        assert run.strategies[0].stats()["models"]["refiner"]["prefill_tokens"] == 0
        assert run.ideal_speedup() == 1.0


# -- the strategy contract ---------------------------------------------------------------------
class TestCoDeContract(StrategyTesterMixin):
    atol = 0.0

    @property
    def strategies(self):
        vq = tiny_vq()
        return [CoDe(refiner=tiny_var(vq, seed=1, depth=1, width=16), draft_steps=2)]

    def make_pipeline(self):
        return VARPipeline(tiny_var(tiny_vq(), depth=2), tiny_vq(), CLASSES)

    def run_pipeline(self, pipe, inputs, seed, row_offset=0):
        generators = [
            torch.Generator().manual_seed(1000 * seed + row_offset + i) for i in range(len(inputs))
        ]
        out = pipe(inputs, generator=generators, output_type="tokens", **SAMPLED)
        # the pipeline keeps its last call's decoder, attached or not; the fingerprint of
        # detach_restores compares the pipeline's attributes, so drop that per-call state
        pipe.decoder = None
        return torch.cat(out.token_maps, dim=1)  # (B, L)

    def sample_inputs(self):
        return [0, 2, 1, 2]

    def broken_call(self, pipe):
        pipe([0, 7], temperature=0)  # class 7 of 3: refused inside the guarded call


# -- refusals ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("refiner", "message"),
    [
        (lambda vq: tiny_var(vq, classes=4), r"num_classes 4 \(the pipeline has 3\)"),
        (
            lambda vq: tiny_var(tiny_vq(patch_nums=(1, 2, 3, 5))),
            r"patch_nums \(1, 2, 3, 5\) \(the pipeline has \(1, 2, 3, 4\)\)",
        ),
        (lambda vq: tiny_var(tiny_vq(vocab=32)), r"vocab_size 32 \(the pipeline has 16\)"),
        (
            lambda vq: tiny_var(vq).float(),
            r"in torch.float32, the pipeline's model on cpu in torch.float64; move it first",
        ),
    ],
    ids=["classes", "patch_nums", "vocab", "dtype"],
)
def test_a_refiner_that_does_not_fit_is_refused_and_nothing_stays_attached(
    pipe, vq, refiner, message
):
    with pytest.raises(ConfigError, match=r"strategies\.0\.params\.refiner: .*" + message):
        decodekit.attach(pipe, [code(refiner(vq), 2)])
    assert attached_run(pipe) is None


def test_bad_params_are_refused_with_the_key(pipe, small, tmp_path):
    with pytest.raises(ConfigError, match=r"draft_steps: 5 is more than this pipeline's 4 scales"):
        decodekit.attach(pipe, [code(small, 5)])
    with pytest.raises(ConfigError, match=r"draft_steps: Input should be greater than or equal"):
        decodekit.attach(pipe, [code(small, -1)])
    with pytest.raises(ConfigError, match=r"refiner: .*expected zoo:<name>, a folder or a VARTr"):
        decodekit.attach(pipe, [code(pipe, 2)])
    with pytest.raises(UnknownNameError, match=r"params\.refiner: unknown zoo model 'nope'"):
        decodekit.attach(pipe, [code("zoo:nope", 2)])
    with pytest.raises(ConfigError, match=r"refiner: .*holds no VAR transformer"):
        decodekit.attach(pipe, [code(str(tmp_path), 2)])
    with pytest.raises(ConfigError, match=r"refiner: model folder .* does not exist"):
        decodekit.attach(pipe, [code(str(tmp_path / "missing"), 2)])
    VARPipeline(small, tiny_vq(seed=1)).save_pretrained(tmp_path / "other-vq")
    with pytest.raises(ConfigError, match=r"refiner: the refiner's folder holds another VQ-VAE"):
        decodekit.attach(pipe, [code(str(tmp_path / "other-vq"), 2)])
    with pytest.raises(ConfigError, match=r"draft_steps: Field required"):
        decodekit.attach(pipe, [{"name": "code", "params": {"refiner": small}}])
    assert attached_run(pipe) is None


# -- folders and YAML --------------------------------------------------------------------------
def test_refiner_folders_load_on_the_pipelines_dtype_and_run_from_yaml(pipe, vq, small, tmp_path):
    VARPipeline(small, vq, CLASSES).save_pretrained(tmp_path / "small")
    pipe.save_pretrained(tmp_path / "large")
    want = None
    for source in (tmp_path / "small", tmp_path / "small" / "transformer"):
        with decodekit.attach(pipe, [code(str(source), 2)]) as run:
            loaded = run.strategies[0].refiner
            assert loaded is not small and next(loaded.parameters()).dtype == torch.float64
            out = pipe([0, 1], generator=gens((3, 4)), **SAMPLED)
        want = want or out
        assert_same_call(want, out)
    with decodekit.attach(pipe, [code(small, 2)]):
        assert_same_call(want, pipe([0, 1], generator=gens((3, 4)), **SAMPLED))

    config = {
        "pipeline": {"type": "var", "model": str(tmp_path / "large"), "dtype": "float64"},
        "strategies": [code(str(tmp_path / "small"), 2)],
        "inputs": {"prompt": CLASSES[:2], "cfg": 2.0, "top_k": 8, "seed": 0},
        "output": {"dir": str(tmp_path / "out")},
        "bench": {"warmup": 0},
    }
    path = tmp_path / "code.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 2
    bench = ["bench", str(path), "--repeat", "1", "--json", str(tmp_path / "b.json")]
    assert main([*bench, "--set", f"output.dir={tmp_path / 'bench'}"]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["ideal_speedup"] > 1 and result["nfe"]["strategy"] == K
