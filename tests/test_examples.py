"""The shipped examples/*.yaml: each one loads and validates, and the generated ones hold
what their headers say."""

from __future__ import annotations

from pathlib import Path

import pytest
from decodekit.config import load_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
YAMLS = sorted(EXAMPLES.glob("*.yaml"))


def test_there_are_examples():
    assert len(YAMLS) >= 5


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_example_loads(path, manager):
    config = load_config(path, manager=manager)
    assert config.strategies, f"{path.name} attaches no strategy"
    assert config.resolve_strategies(manager)


def test_dkv_cache_fewshot_prompts_are_the_documented_ones(manager):
    from decodekit.pipelines.judges import arith_answer_forms
    from decodekit.pipelines.zoo.arith_data import held_out_few_shot

    config = load_config(EXAMPLES / "dkv-cache-fewshot.yaml", manager=manager)
    problems = held_out_few_shot(128, 32, padded=True)
    assert config.inputs.prompt == [p for p, _ in problems]
    assert config.inputs.batch_size == 8
    # the bench's accuracy metric reads every prompt's expected answer
    assert all(a in arith_answer_forms(p) for p, a in problems)


def test_block_cache_prompts_are_the_documented_ones(manager):
    from decodekit.pipelines.zoo.arith_data import held_out_few_shot

    config = load_config(EXAMPLES / "block-cache.yaml", manager=manager)
    assert config.inputs.prompt == [p for p, _ in held_out_few_shot(16, 32, padded=True)]
