"""decodekit.compat: the private upstream internals decodekit relies on still exist and work.

A failure here means an upstream release changed something decodekit reaches
through `decodekit.compat`; the message names the symbol and the installed version.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import torch
from decodekit import compat
from decodekit.testing import tiny_llama, tiny_sd_pipeline
from diffusers.hooks import HookRegistry
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]

# Private upstream names only core/compat.py may spell (attributes included).
PRIVATE_NAMES = sorted(
    {e.name for e in compat.INTERNALS if e.name.startswith("_")}
    | {
        "_eos_token_tensor",
        "_pad_token_tensor",
        "_reorder_cache",
        "_diffusers_hook",
        "_global_mapping",
        "_attn_implementation_internal",
    }
)


def _changed(library: str, what: str) -> str:
    return (
        f"{library} {compat.installed_version(library)} changed a private API decodekit uses: "
        f"{what}. decodekit was tested with {library} {compat.TESTED_WITH[library]}; update "
        "core/compat.py (and the range in pyproject.toml) for this release."
    )


@pytest.mark.parametrize("entry", compat.INTERNALS, ids=lambda e: e.symbol)
def test_internal_exists_with_the_parameters_decodekit_passes(entry):
    problem = entry.problem()
    assert problem is None, _changed(entry.library, f"{problem} (used by compat.{entry.used_by})")


def test_custom_generate_loop_through_compat_equals_greedy_generate():
    model = tiny_llama()
    input_ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    seen = {}

    def greedy(
        model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs
    ):
        eos = compat.eos_token_tensor(generation_config)
        pad = compat.pad_token_tensor(generation_config)
        seen.update(eos=eos, pad=pad)
        outputs = compat.prefill(model, input_ids, generation_config, model_kwargs)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        while True:
            model_kwargs = compat.update_model_kwargs(model, outputs, model_kwargs)
            scores = logits_processor(input_ids, outputs.logits[:, -1, :])  # (B, V)
            token = torch.where(done, pad, scores.argmax(-1))  # (B,)
            input_ids = torch.cat([input_ids, token[:, None]], dim=1)
            done |= stopping_criteria(input_ids, scores)
            if bool(done.all()):
                return input_ids
            inputs = model.prepare_inputs_for_generation(
                input_ids, next_sequence_length=1, **model_kwargs
            )
            outputs = model(**inputs, return_dict=True)

    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2)
    with torch.no_grad():
        expected = model.generate(input_ids, **kw)
        got = model.generate(input_ids, custom_generate=greedy, **kw)
    assert seen["eos"] is not None and seen["eos"].tolist() == [2], _changed(
        "transformers", f"generation_config._eos_token_tensor is {seen['eos']!r}"
    )
    assert seen["pad"] is not None and int(seen["pad"]) == 0, _changed(
        "transformers", f"generation_config._pad_token_tensor is {seen['pad']!r}"
    )
    assert torch.equal(got, expected), _changed(
        "transformers", "prefill / update_model_kwargs no longer reproduce greedy generate"
    )


def test_attn_implementation_reads_what_set_attn_implementation_set():
    model = tiny_llama()
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        assert compat.attn_implementation(model) == implementation, _changed(
            "transformers", "config._attn_implementation does not follow set_attn_implementation"
        )


def test_hook_registry_is_found_and_removed():
    module = torch.nn.Linear(2, 2)
    assert compat.hook_registry(module) is None
    registry = HookRegistry.check_if_exists_or_initialize(module)
    assert compat.hook_registry(module) is registry, _changed(
        "diffusers",
        "HookRegistry.check_if_exists_or_initialize no longer sets module._diffusers_hook",
    )
    compat.remove_hook_registry(module)
    assert compat.hook_registry(module) is None
    assert HookRegistry.check_if_exists_or_initialize(module) is not registry  # a fresh one


def test_callback_tensor_inputs_of_a_stable_diffusion_pipeline():
    inputs = compat.callback_tensor_inputs(tiny_sd_pipeline())
    assert {"latents", "prompt_embeds"} <= set(inputs), _changed(
        "diffusers", f"StableDiffusionPipeline._callback_tensor_inputs is {inputs!r}"
    )


def test_a_missing_internal_raises_naming_symbol_and_version():
    with pytest.raises(
        compat.UpstreamChangedError, match=r"_prefill is missing in transformers 5\."
    ):
        compat.prefill(torch.nn.Linear(2, 2), None, None, {})


@pytest.mark.parametrize("library", ["torch", "diffusers", "transformers"])
def test_installed_version_is_in_the_declared_range(library):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = {(r := Requirement(d)).name: r for d in pyproject["project"]["dependencies"]}
    specifier = requirements[library].specifier
    assert str(specifier).count("<") == 1, f"{library}: declare an upper bound ({specifier})"
    installed = compat.installed_version(library)
    assert specifier.contains(installed, prereleases=True), (
        f"{library} {installed} is outside the tested range {specifier} in pyproject.toml"
    )
    assert specifier.contains(compat.TESTED_WITH[library])


def test_only_compat_spells_private_upstream_names():
    pattern = re.compile(r"\.(%s)\b|\"(%s)\"" % (("|".join(PRIVATE_NAMES),) * 2))
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for folder in ("core", "plugins", "pipelines")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.name != "compat.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and not line.lstrip().startswith("#")
    ]
    assert not offenders, "reach these through decodekit.compat:\n" + "\n".join(offenders)
