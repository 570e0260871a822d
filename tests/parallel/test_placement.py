"""One placement for the code and the cost model: the collectives `foe.parallel` really issues in a forward,
counted from its ledger on real ranks, equal `ParallelDims.collectives`, for every strategy and FoE sync
mode; and the cost model's layout (`foe.sim.cost_model.layout`) counts the same calls and refuses what the
code refuses."""

from __future__ import annotations

import pytest

from foe.config import ModelConfig
from foe.parallel import run_ranks
from foe.placement import ParallelDims
from foe.sim.cost_model import layout
from foe.sim.hardware import get_cluster
from tests.parallel.workers import collective_count_worker

CASES_2 = [dict(cfg=dict(arch="moe"), dims=dict(strategy="ep")),
           dict(cfg=dict(arch="moe"), dims=dict(strategy="tp")),
           *(dict(cfg=dict(arch="foe", sync=s), dims=dict(strategy="gp")) for s in ("attention", "moe", "both"))]
CASES_4 = [dict(cfg=dict(arch="foe", sync=s), dims=dict(strategy="gp", ranks_per_group=2, ranks_per_node=2))
           for s in ("attention", "both")]


@pytest.mark.parametrize("world,cases", [(2, CASES_2), (4, CASES_4)])
def test_the_code_issues_the_collectives_the_placement_predicts(world: int, cases: list[dict]) -> None:
    counted = run_ranks(collective_count_worker, world, cases, timeout_s=300)
    for case, i in zip(cases, range(len(cases))):
        cfg = ModelConfig.from_preset("tiny", **case["cfg"])
        want = ParallelDims(world_size=world, **case["dims"]).collectives(cfg)
        for rank in range(world):
            assert counted[rank][i] == want, f"{case} rank {rank}"


@pytest.mark.parametrize("case", CASES_2 + CASES_4)
def test_the_cost_model_counts_the_same_calls(case: dict) -> None:
    cfg = ModelConfig.from_preset("tiny", **case["cfg"])
    world = 4 if case["dims"].get("ranks_per_group") else 2
    nodes = 2 if case["dims"].get("ranks_per_node") else 1
    lay = layout(cfg, case["dims"]["strategy"], get_cluster("h100", nodes=nodes, devices_per_node=world // nodes))
    want = ParallelDims(world_size=world, **case["dims"]).collectives(cfg)
    final = 1 if case["dims"]["strategy"] == "gp" and cfg.sync == "attention" else 0
    assert lay.allreduces * cfg.n_layers + final == want.get("all_reduce", 0)
    assert (lay.a2a_ranks_per_node * lay.a2a_nodes > 1) == ("all_to_all" in want)


def test_the_cost_model_refuses_the_layouts_the_code_refuses() -> None:
    # tp splits KV heads: 7b has 8, so 16 ranks cannot (the old sim replicated them and projected it anyway)
    cfg = ModelConfig.from_preset("7b", arch="moe")
    with pytest.raises(ValueError, match="n_kv_heads"):
        layout(cfg, "tp", get_cluster("h100", nodes=2))
    with pytest.raises(ValueError, match="n_kv_heads"):
        ParallelDims("tp", 16).validate(cfg)


def test_describe_counts_what_each_sync_mode_adds() -> None:
    dims = ParallelDims("gp", 2)
    assert "+1 before the head" in dims.describe(ModelConfig.from_preset("tiny", arch="foe"))
    assert "2 all-reduces" in dims.describe(ModelConfig.from_preset("tiny", arch="foe", sync="both"))
    assert "+1" not in dims.describe(ModelConfig.from_preset("tiny", arch="foe", sync="moe"))
