"""ModelConfig checks every field's type against its annotation (bool is not an int; floats accept ints)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from foe.config import ModelConfig
from foe.model.checkpoint import CheckpointError, load_config, save_checkpoint
from tests.conftest import build, tiny


@pytest.mark.parametrize("field,value,msg", [
    ("n_layers", True, "n_layers must be an int, got True (bool)"),
    ("d_model", 64.0, "d_model must be an int, got 64.0 (float)"),
    ("vocab_size", "320", "vocab_size must be an int, got '320' (str)"),
    ("rope_theta", "big", "rope_theta must be a finite float, got 'big' (str)"),
    ("rope_theta", False, "rope_theta must be a finite float, got False (bool)"),
    ("norm_eps", float("inf"), "norm_eps must be a finite float, got inf"),
    ("tie_embeddings", "no", "tie_embeddings must be a bool (true/false), got 'no' (str)"),
    ("router_renorm", 1, "router_renorm must be a bool (true/false), got 1 (int)"),
    ("router_score", 3, "router_score must be a str, got 3 (int)"),
    ("arch", None, "arch must be one of ('moe', 'foe'), got None"),
])
def test_wrong_types_name_field_type_and_value(field: str, value, msg: str) -> None:
    with pytest.raises(ValueError, match=re.escape(msg)):
        ModelConfig(**{**ModelConfig.from_preset("tiny").to_dict(), field: value})


def test_float_fields_accept_ints_and_store_floats() -> None:
    cfg = ModelConfig(rope_theta=10000, norm_eps=1)
    assert type(cfg.rope_theta) is float and type(cfg.norm_eps) is float
    assert cfg == ModelConfig(rope_theta=10000.0, norm_eps=1.0)


def test_config_json_with_wrong_types_is_a_checkpoint_error(tmp_path: Path) -> None:
    ck = save_checkpoint(build(tiny("foe")), tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "n_layers": True}))
    with pytest.raises(CheckpointError, match="config.json: invalid ModelConfig: n_layers must be an int"):
        load_config(ck)
