"""Issue 22, hand-written: bad inputs, options and oversized configs are one `error:` line, never a traceback.

Each case of the issue is here: what `validate` refuses before any model
loads (adapter input ranges, option allow-lists, size limits), and what `run`
refuses on the zoo models once the loaded pipeline is known (unknown
``inputs.extra`` keys, faster-diffusion key steps past the last step), plus
how any other exception is reported (stage, type, bounded message).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from decodekit.cli import main
from decodekit.config import MAX_CONFIG_BYTES, load_config
from decodekit.errors import ConfigError
from decodekit.pipelines.masked_diffusion_adapter import MaskedDiffusionLMAdapter
from decodekit.pipelines.stable_diffusion import StableDiffusionAdapter

SD = {
    "pipeline": {"type": "stable-diffusion", "model": "zoo:shapes-sd", "device": "cpu"},
    "inputs": {"prompt": ["a red circle"], "num_inference_steps": 2, "height": 32, "width": 32},
}
MDLM = {
    "pipeline": {"type": "masked-diffusion-lm", "model": "zoo:arith-mdlm", "device": "cpu"},
    "inputs": {"prompt": ["12+7="], "gen_length": 8, "block_length": 4, "steps": 4},
}
AR = {
    "pipeline": {"type": "causal-lm", "model": "zoo:arith-ar", "device": "cpu"},
    "inputs": {"prompt": ["12+7="], "max_new_tokens": 4},
}


def cli(capsys, tmp_path: Path, doc: dict | str, *args: str, command: str = "validate"):
    """Run ``decodekit COMMAND`` on ``doc`` in-process: (exit code, stdout, stderr)."""
    path = tmp_path / "config.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    capsys.readouterr()
    code = main([command, str(path), *args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(code: int, err: str) -> str:
    """The single ``error:`` line of a refused command (and no traceback)."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# -- part 1: inputs checked before the model loads -------------------------------------------

VALIDATE_CASES = [
    (
        SD,
        "inputs.num_inference_steps=0",
        "inputs.num_inference_steps",
        "greater than or equal to 1",
    ),
    (SD, "inputs.num_inference_steps=-3", "inputs.num_inference_steps", "greater than or equal"),
    (SD, "inputs.prompt=[]", "inputs.prompt", "the prompt list is empty"),
    (SD, "inputs.seed=18446744073709551616", "inputs.seed", "less than or equal to"),
    (SD, "inputs.seed=-1", "inputs.seed", "greater than or equal to 0"),
    (
        SD,
        "inputs.num_images_per_prompt=0",
        "inputs.num_images_per_prompt",
        "greater than or equal to 1",
    ),
    (SD, "inputs.guidance_scale=.nan", "inputs.guidance_scale", "finite number"),
    (SD, "inputs.height=null", "inputs.width", "width is given without height"),
    (SD, "inputs.width=30", "inputs.width", "multiple of 8"),
    (SD, "inputs.height=1000000", "inputs.height", "less than or equal to 4096"),
    (SD, "inputs.num_images_per_prompt=1000000000", "inputs.num_images_per_prompt", "64"),
    (SD, "inputs.negative_prompt=[a, b]", "inputs.negative_prompt", "list as long as prompt"),
    (SD, "inputs.extra.generator=1", "inputs.extra.generator", "set inputs.seed instead"),
    (SD, "inputs.extra.eta=.inf", "inputs.extra.eta", "finite number"),
    (MDLM, "inputs.block_length=3", "inputs.block_length", "must be a multiple of block_length"),
    (MDLM, "inputs.steps=3", "inputs.steps", "multiple of the number of blocks"),
    (MDLM, "inputs.steps=0", "inputs.steps", "greater than or equal to 1"),
    (MDLM, "inputs.steps=16", "inputs.steps", "exceed block_length"),
    (MDLM, "inputs.gen_length=100000000", "inputs.gen_length", "less than or equal"),
    (MDLM, "inputs.remasking=rand", "inputs.remasking", "Did you mean 'random'?"),
    (MDLM, "inputs.temperature=.nan", "inputs.temperature", "finite number"),
    (MDLM, "inputs.batch_size=0", "inputs.batch_size", "greater than or equal to 1"),
    (AR, "inputs.prompt=''", "inputs.prompt", "a prompt is empty"),
    (AR, "inputs.max_new_tokens=0", "inputs.max_new_tokens", "greater than or equal to 1"),
    (AR, "inputs.max_new_tokens=10000000000", "inputs.max_new_tokens", "less than or equal"),
    (AR, "inputs.extra.temprature=0.7", "inputs.extra.temprature", "Did you mean 'temperature'?"),
    (AR, "inputs.extra.num_beams=0", "inputs.extra.num_beams", "must be in [1, 64]"),
    (AR, "inputs.extra.top_p=.nan", "inputs.extra.top_p", "finite number"),
    (AR, "inputs.extra.max_new_tokens=3", "inputs.extra.max_new_tokens", "inputs.max_new_tokens"),
]


@pytest.mark.parametrize(
    ("doc", "override", "path", "words"),
    VALIDATE_CASES,
    ids=[f"{d['pipeline']['type']}:{o}" for d, o, _, _ in VALIDATE_CASES],
)
def test_validate_refuses_inputs_the_pipeline_would_fail_on(
    capsys, tmp_path, doc, override, path, words
):
    line = one_error(*cli(capsys, tmp_path, doc, "--set", override)[::2])
    assert line.startswith(f"error: {path}: "), line
    assert words in line


def test_threshold_without_threshold_decoding_is_refused(capsys, tmp_path):
    doc = {**MDLM, "inputs": {**MDLM["inputs"], "remasking": "random", "threshold": 0.5}}
    line = one_error(*cli(capsys, tmp_path, doc)[::2])
    assert line.startswith("error: inputs.threshold: ") and "threshold decoding" in line


@pytest.mark.parametrize("doc", [SD, MDLM, AR], ids=["sd", "mdlm", "ar"])
def test_the_reference_inputs_are_accepted(capsys, tmp_path, doc):
    code, out, err = cli(capsys, tmp_path, doc)
    assert code == 0, err
    assert out.startswith("ok: ")


def test_a_negative_prompt_string_is_given_to_every_prompt():
    doc = {**SD, "inputs": {**SD["inputs"], "prompt": ["a", "b"], "negative_prompt": "blurry"}}
    assert load_config(doc).inputs.negative_prompt == ["blurry", "blurry"]


# -- part 1: checks once the pipeline is loaded, and the stage of other errors ----------------


def test_run_refuses_an_extra_key_the_pipeline_call_does_not_take(capsys, tmp_path):
    doc = {
        **SD,
        "inputs": {**SD["inputs"], "extra": {"etaa": 0.0}},
        "output": {"dir": str(tmp_path / "out")},
    }
    line = one_error(*cli(capsys, tmp_path, doc, command="run")[::2])
    assert line.startswith(
        "error: inputs.extra.etaa: StableDiffusionPipeline.__call__ takes no 'etaa'"
    )
    assert "Did you mean 'eta'?" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_run_refuses_faster_diffusion_key_steps_past_the_last_step(capsys, tmp_path):
    doc = {
        **SD,
        "strategies": [{"name": "faster-diffusion", "params": {"key_steps": [0, 1, 7]}}],
        "output": {"dir": str(tmp_path / "out")},
    }
    line = one_error(*cli(capsys, tmp_path, doc, command="run")[::2])
    assert "params.key_steps: [7] past the last step" in line
    assert "valid steps are 0..1" in line


def test_any_other_exception_is_one_line_with_its_stage(capsys, tmp_path):
    # DDIM takes no custom timesteps: diffusers raises ValueError inside the pipeline call
    doc = {
        **SD,
        "inputs": {**SD["inputs"], "extra": {"timesteps": [1, 0]}},
        "output": {"dir": str(tmp_path / "out")},
    }
    line = one_error(*cli(capsys, tmp_path, doc, command="run")[::2])
    assert line.startswith("error: generating: ValueError: "), line
    assert len(line) < 400


def test_debug_prints_the_traceback_too(capsys, tmp_path):
    doc = {
        **SD,
        "inputs": {**SD["inputs"], "extra": {"timesteps": [1, 0]}},
        "output": {"dir": str(tmp_path / "out")},
    }
    code, _, err = cli(capsys, tmp_path, doc, "--debug", command="run")
    assert code == 2
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("error: generating: ValueError: ")


def test_an_exception_while_loading_names_the_stage(capsys, tmp_path, monkeypatch):
    def broken(cls, source, **kwargs):
        raise RuntimeError("x" * 5000)

    monkeypatch.setattr(StableDiffusionAdapter, "load", classmethod(broken))
    doc = {**SD, "output": {"dir": str(tmp_path / "out")}}
    line = one_error(*cli(capsys, tmp_path, doc, command="run")[::2])
    assert line.startswith("error: loading model: RuntimeError: xxx")
    assert len(line) < 360


# -- part 2: no code or network from a config ------------------------------------------------


@pytest.mark.parametrize("doc", [SD, MDLM, AR], ids=["sd", "mdlm", "ar"])
def test_a_config_cannot_enable_remote_code(capsys, tmp_path, doc):
    line = one_error(
        *cli(capsys, tmp_path, doc, "--set", "pipeline.options.trust_remote_code=true")[::2]
    )
    assert line.startswith("error: pipeline.options.trust_remote_code: ")
    assert "--trust-remote-code" in line and "executes Python files" in line


@pytest.mark.parametrize("doc", [SD, MDLM, AR], ids=["sd", "mdlm", "ar"])
def test_a_config_cannot_go_online(capsys, tmp_path, doc):
    line = one_error(
        *cli(capsys, tmp_path, doc, "--set", "pipeline.options.local_files_only=false")[::2]
    )
    assert line.startswith("error: pipeline.options.local_files_only: ")
    assert "never downloads" in line


@pytest.mark.parametrize(
    ("doc", "known"),
    [
        (SD, "scheduler, variant, use_safetensors, device_map"),
        (MDLM, "mask_token_id, device_map"),
        (AR, "device_map"),
    ],
    ids=["sd", "mdlm", "ar"],
)
def test_options_are_an_allow_list(capsys, tmp_path, doc, known):
    line = one_error(*cli(capsys, tmp_path, doc, "--set", "pipeline.options.revision=main")[::2])
    assert line.startswith("error: pipeline.options.revision: unknown key")
    assert f"Known keys: {known}." in line


def test_an_unknown_scheduler_is_refused_by_validate(capsys, tmp_path):
    line = one_error(*cli(capsys, tmp_path, SD, "--set", "pipeline.options.scheduler=ddpm")[::2])
    assert line.startswith("error: pipeline.options.scheduler: ")


def test_the_adapter_load_refuses_what_the_config_refuses():
    with pytest.raises(ConfigError) as e:
        MaskedDiffusionLMAdapter.load(
            "unused", device="cpu", dtype="float32", options={"trust_remote_code": True}
        )
    assert e.value.path == "pipeline.options.trust_remote_code"


def test_trust_remote_code_reaches_load_only_from_the_flag(monkeypatch):
    seen = []

    def fake(cls, source, *, device, dtype, options, trust_remote_code=False):
        seen.append(trust_remote_code)
        return object()

    monkeypatch.setattr(StableDiffusionAdapter, "load", classmethod(fake))
    load_config(SD).load_pipeline()
    load_config(SD, trust_remote_code=True).load_pipeline()
    assert seen == [False, True]


def test_trust_remote_code_is_refused_by_an_adapter_that_cannot_take_it(monkeypatch):
    def fake(cls, source, *, device, dtype, options):
        return object()

    monkeypatch.setattr(StableDiffusionAdapter, "load", classmethod(fake))
    with pytest.raises(ConfigError) as e:
        load_config(SD, trust_remote_code=True).load_pipeline()
    assert e.value.path == "--trust-remote-code"


def test_the_flag_names_the_risk(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "--trust-remote-code" in out and "RISK" in out


# -- part 3: resource bombs ------------------------------------------------------------------

LAUGHS = "\n".join(
    ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    + ["pipeline: {type: stable-diffusion, model: zoo:shapes-sd}", "inputs: {prompt: *a9}"]
)


def test_a_billion_laughs_config_is_refused_fast(capsys, tmp_path):
    cli(capsys, tmp_path, SD)  # imports and plugins loaded before the clock starts
    assert len(LAUGHS.encode()) < 1000
    t0 = time.perf_counter()
    code, _, err = cli(capsys, tmp_path, LAUGHS)
    took = time.perf_counter() - t0
    line = one_error(code, err)
    assert "more than 100,000 values" in line
    assert took < 0.5, took


def test_a_self_referencing_config_is_refused(capsys, tmp_path):
    doc = "pipeline: {type: causal-lm, model: zoo:arith-ar}\ninputs: &x {prompt: a, extra: {e: [*x]}}\n"
    line = one_error(*cli(capsys, tmp_path, doc)[::2])
    assert "recursive" in line or "levels deep" in line


def test_a_deeply_nested_config_is_refused(capsys, tmp_path):
    deep = (
        "pipeline: {type: causal-lm, model: zoo:arith-ar}\ninputs: {prompt: a, extra: {e: "
        + "[" * 40
        + "]" * 40
        + "}}\n"
    )
    line = one_error(*cli(capsys, tmp_path, deep)[::2])
    assert "nested more than 32 levels deep" in line


def test_a_nesting_the_parser_cannot_follow_is_refused(capsys, tmp_path):
    line = one_error(*cli(capsys, tmp_path, "x: " + "[" * 20000 + "]" * 20000)[::2])
    assert "nested too deeply" in line


def test_a_huge_config_file_is_refused_unread(capsys, tmp_path):
    line = one_error(*cli(capsys, tmp_path, "# " + "x" * MAX_CONFIG_BYTES)[::2])
    assert "larger than 1024 KiB" in line


def test_an_error_about_a_large_value_is_short(capsys, tmp_path):
    doc = {**SD, "inputs": {**SD["inputs"], "num_inference_steps": [[list(range(50))] * 50] * 30}}
    line = one_error(*cli(capsys, tmp_path, doc)[::2])
    assert line.startswith("error: inputs.num_inference_steps: ")
    assert len(line) < 300


def test_a_key_with_control_characters_stays_visible_in_the_error(capsys, tmp_path):
    doc = {**SD, "inputs": {**SD["inputs"], "\r": 1}}
    line = one_error(*cli(capsys, tmp_path, doc)[::2])
    assert line.startswith("error: inputs.\\r: unknown key"), line
