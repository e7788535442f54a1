"""The shapes-vlm vision-tower pretraining stage: deterministic, and loadable into the LLaVA."""

from __future__ import annotations

import json

import pytest
import torch
from decodekit.pipelines.zoo.shapes_vision_pretrain import load_vision_init, pretrain_vision
from decodekit.pipelines.zoo.train_shapes_vlm import new_model
from safetensors.torch import load_file

SMALL = {"patch_size": 8, "vision_width": 32, "vision_layers": 1}


def _pretrain(path):
    return pretrain_vision(path, steps=3, batch_size=8, num_images=30, check_every=3, **SMALL)


def test_pretrain_is_seeded_and_writes_its_record(tmp_path):
    record = _pretrain(tmp_path / "a.safetensors")
    _pretrain(tmp_path / "b.safetensors")
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["final"] == record["final"] and set(record["final"]) >= {"shape", "overall"}


def test_vision_init_loads_the_tower_and_only_the_tower(tmp_path):
    path = tmp_path / "tower.safetensors"
    _pretrain(path)
    model = new_model(0, **SMALL, text_width=32, text_layers=1, text_intermediate=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_vision_init(model, path)
    tower = model.model.vision_tower.state_dict()
    assert all(torch.equal(tower[k], v) for k, v in load_file(str(path)).items())
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all("vision_tower" in k for k in changed)


def test_vision_init_refuses_a_tower_of_another_shape(tmp_path):
    path = tmp_path / "tower.safetensors"
    _pretrain(path)
    model = new_model(0, patch_size=8, vision_width=64, vision_layers=1, text_layers=1)
    with pytest.raises(ValueError, match="same --patch-size"):
        load_vision_init(model, path)
