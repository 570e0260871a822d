"""Every strategy gives the single-process model's logits (prefill and KV-cached decode), on 2 and 4
gloo processes, including idle experts, a rank with no sequences, and the multi-node gp layout."""

from __future__ import annotations

import pytest

from foe.parallel import run_ranks
from tests.parallel.workers import parity_worker

TOL = 2e-5

CASES_2 = [
    dict(name="ep", cfg=dict(arch="moe"), dims=dict(strategy="ep"), B=4, L=6, steps=3),
    dict(name="ep-idle-rank", cfg=dict(arch="moe"), dims=dict(strategy="ep"), B=3, L=5, steps=2,
         split=[[0, 1, 2], []]),
    dict(name="tp", cfg=dict(arch="moe"), dims=dict(strategy="tp"), B=3, L=6, steps=3),
    dict(name="gp-attention", cfg=dict(arch="foe"), dims=dict(strategy="gp"), B=3, L=6, steps=3),
    dict(name="gp-moe-sync", cfg=dict(arch="foe", sync="moe"), dims=dict(strategy="gp"), B=2, L=5, steps=2),
    dict(name="gp-both-sync", cfg=dict(arch="foe", sync="both"), dims=dict(strategy="gp"), B=2, L=5, steps=2),
    dict(name="gp-2-groups-per-rank", cfg=dict(arch="foe", n_heads=4, n_kv_heads=4, top_k=4),
         dims=dict(strategy="gp"), B=2, L=5, steps=2),
]

CASES_4 = [
    dict(name="ep", cfg=dict(arch="moe"), dims=dict(strategy="ep"), B=5, L=4, steps=2),
    dict(name="tp", cfg=dict(arch="moe", n_heads=4, n_kv_heads=4), dims=dict(strategy="tp"), B=2, L=4, steps=2),
    dict(name="gp-1-group-per-rank", cfg=dict(arch="foe", n_heads=4, n_kv_heads=4, top_k=4),
         dims=dict(strategy="gp"), B=2, L=4, steps=2),
    dict(name="gp-multinode", cfg=dict(arch="foe"), dims=dict(strategy="gp", ranks_per_group=2, ranks_per_node=2),
         B=4, L=4, steps=2),
    dict(name="gp-multinode-idle-shard", cfg=dict(arch="foe"),
         dims=dict(strategy="gp", ranks_per_group=2, ranks_per_node=2), B=2, L=4, steps=1, split=[[0, 1], []]),
]


def _full_params(case: dict) -> int:
    from foe.config import ModelConfig
    return ModelConfig.from_preset("tiny", **case["cfg"]).num_params


def _check(world: int, cases: list[dict]) -> list[list[dict]]:
    results = run_ranks(parity_worker, world, cases, timeout_s=300)
    for rank, per_case in enumerate(results):
        for case, res in zip(cases, per_case):
            assert res["diff"] < TOL, f"{case['name']} rank {rank}: max |logit diff| {res['diff']:.2e}"
    return results


def test_parity_two_ranks() -> None:
    results = _check(2, CASES_2)
    by_name = {c["name"]: [r[i] for r in results] for i, c in enumerate(CASES_2)}
    assert by_name["ep-idle-rank"][1]["rows"] == []  # the idle rank really had no sequences
    assert any(r["decode_has_idle_expert"] for r in by_name["ep"])
    # gp with one group per rank on one node: all-reduce only, never an all-to-all.
    for name in ("gp-attention", "gp-moe-sync", "gp-both-sync"):
        assert set(by_name[name][0]["summary"]["ops"]) == {"all_reduce"}
    assert set(by_name["ep"][0]["summary"]["ops"]) == {"all_to_all", "all_to_all_counts"}
    assert set(by_name["tp"][0]["summary"]["ops"]) == {"all_reduce"}
    # Each rank holds only its share: tiny has 2 KV heads and 8 experts.
    assert by_name["gp-attention"][0]["shares"] | {"params": 0} == {"kv_heads": 1, "experts": 4, "params": 0}
    assert by_name["tp"][1]["shares"]["kv_heads"] == 1 and by_name["tp"][1]["shares"]["experts"] == 4
    assert by_name["ep"][0]["shares"]["kv_heads"] == 2 and by_name["ep"][0]["shares"]["experts"] == 4
    for name in ("ep", "tp", "gp-attention"):
        assert by_name[name][0]["shares"]["params"] < 0.75 * _full_params(CASES_2[[c["name"] for c in CASES_2].index(name)])


def test_parity_four_ranks_and_multinode_layout() -> None:
    results = _check(4, CASES_4)
    i = [c["name"] for c in CASES_4].index("gp-multinode")
    assert results[0][i]["shares"]["experts"] == 2  # 2 groups x 2 ranks: 4 experts per group, 2 per rank
    for rank_results in results:
        recs = rank_results[i]["records"]
        # The all-reduce runs across nodes; the all-to-all stays inside each node.
        assert all(r["bytes_intra"] == 0 and r["bytes_inter"] > 0 for r in recs if r["op"] == "all_reduce")
        assert all(r["bytes_inter"] == 0 for r in recs if r["op"].startswith("all_to_all"))
        assert any(r["bytes_intra"] > 0 for r in recs if r["op"] == "all_to_all")


def test_dead_rank_fails_fast_instead_of_hanging() -> None:
    from tests.parallel.workers import dying_worker
    with pytest.raises(RuntimeError, match=r"rank 1 \(pid \d+\) on this host died"):
        run_ranks(dying_worker, 2, timeout_s=60)


def test_ranks_join_on_the_cpu_over_gloo() -> None:
    from tests.parallel.workers import placement_worker
    assert run_ranks(placement_worker, 2, timeout_s=60) == [("cpu", "gloo"), ("cpu", "gloo")]
