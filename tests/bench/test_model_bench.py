"""`foe bench model`: the naive baseline computes our model's function, the floor arithmetic is right on
a hand-worked case, and the command runs end to end on `tiny` and writes valid JSON and a PNG."""

from __future__ import annotations

import json

import pytest
import torch

from foe.bench.model_floor import MachineRates, ffn_work, forward_work, measure_machine
from foe.bench.model_latency import ModelBenchConfig, Row, Timing, targets
from foe.bench.model_naive import NaiveSparseMoE, naive_feed_forwards
from foe.cli.main import main
from foe.config import ModelConfig
from tests.conftest import build, tiny


@pytest.mark.parametrize("arch,sync,score", [("moe", "attention", "softmax"), ("foe", "attention", "softmax"),
                                             ("foe", "moe", "sigmoid")])
def test_naive_loop_equals_fast_model(arch: str, sync: str, score: str) -> None:
    model = build(tiny(arch, sync=sync, router_score=score, router_renorm=score == "softmax"))
    x = torch.randint(0, 320, (3, 21))
    mask = torch.ones(3, 21, dtype=torch.bool)
    mask[1, 15:] = False  # padding: the experts skip these rows on both paths
    fast = model(x, token_mask_BL=mask)
    with naive_feed_forwards(model):
        assert all(isinstance(layer.ffn, NaiveSparseMoE) for layer in model.layers)
        assert model.layers[0].ffn.w13 is model.layers[0].ffn.w13  # shared, not copied
        slow = model(x, token_mask_BL=mask)
    assert not any(isinstance(layer.ffn, NaiveSparseMoE) for layer in model.layers)  # restored
    torch.testing.assert_close(slow.logits, fast.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(slow.expert_counts, fast.expert_counts)
    assert int(fast.expert_counts.sum()) == model.cfg.n_layers * model.cfg.top_k * int(mask.sum())


def test_naive_loop_shares_weights() -> None:
    model = build(tiny("moe"))
    naive = NaiveSparseMoE(model.layers[0].ffn)
    assert naive.w13 is model.layers[0].ffn.experts.w13 and naive.router_weight is model.layers[0].ffn.router.weight


def test_floor_arithmetic_on_a_hand_case() -> None:
    cfg = ModelConfig(vocab_size=10, d_model=4, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=2, n_experts=2,
                      top_k=1, expert_hidden=3, max_seq_len=16)
    # Prefill, 2 sequences x 3 tokens, both experts used, logits for 2 rows.
    # Per token: attention weights 4*(4+2+2) + 4*4 = 48, router 2*4 = 8, one expert 3*4*3 = 36 -> 2*92 = 184
    # matmul FLOPs; attention scores over a mean of (3+1)/2 = 2 keys: 4 * 2 heads * 2 dims * 2 = 32.
    # 6 tokens * 216 + LM head 2 rows * 2*10*4 = 1296 + 160 = 1456 FLOPs.
    # Parameters read: layer 48 + norms 2*4 + router 8 = 64; 2 experts 72; head 40; final norm 4;
    # 6 embedding rows 24 -> 204 * 4 bytes = 816. KV written: 2 (k,v) * 1 head * 2 dims * 4 B * 6 tokens = 96.
    w = forward_work(cfg, batch=2, new_tokens=3, context=0, experts_hit=2, logit_rows=2)
    assert (w.flops, w.weight_bytes, w.kv_bytes) == (1456.0, 816.0, 96.0)
    compute_bound = MachineRates(matmul_gflops=1e-6, copy_gbps=1e-6, threads=1, matmul_size=1, copy_mib=1)
    # 1,000 FLOP/s and 1,000 B/s: 1456 FLOPs take 1.456 s, 816 + 96 = 912 bytes 0.912 s.
    assert w.floor_s(compute_bound) == pytest.approx(1.456)
    memory_bound = MachineRates(matmul_gflops=1e-6, copy_gbps=0.5e-6, threads=1, matmul_size=1, copy_mib=1)
    assert w.floor_s(memory_bound) == pytest.approx(912 / 500)  # 500 B/s: now memory-bound
    # Decode: 2 sequences, 1 new token after 5 cached: mean keys 5 + 1 = 6 -> attention 4*2*2*6 = 96;
    # only one expert hit. FLOPs 2 * (184 + 96) + 160 = 720; params 64 + 36 + 40 + 4 + 2*4 = 152 -> 608 B;
    # KV touched 16 B/token * 2 * 6 = 192.
    d = forward_work(cfg, batch=2, new_tokens=1, context=5, experts_hit=1, logit_rows=2)
    assert (d.flops, d.weight_bytes, d.kv_bytes) == (720.0, 608.0, 192.0)
    with pytest.raises(ValueError, match="experts_hit"):
        forward_work(cfg, batch=1, new_tokens=1, context=0, experts_hit=3, logit_rows=1)
    # One feed-forward layer over 5 tokens, one expert hit: router 8 + one expert 36 weights per token
    # -> 2 * 5 * 44 = 440 FLOPs; router 8 + expert 36 = 44 params read -> 176 bytes.
    f = ffn_work(cfg, tokens=5, experts_hit=1)
    assert (f.flops, f.weight_bytes, f.kv_bytes) == (440.0, 176.0, 0.0)


def test_bound_is_the_naive_loops_distance_from_the_floor() -> None:
    def row(batch: int, naive_ms: float, floor_ms: float) -> Row:
        r = Row("prefill", batch, 8, batch * 8, {k: Timing(ms, ms, ms) for k, ms in
                                                   (("moe", 10.0), ("foe", 12.0), ("naive", naive_ms))},
                {"moe": floor_ms, "foe": floor_ms}, {}, {})
        r.derive()
        return r
    # batch 4 is below the target's batch >= 16, so its (tighter) bound does not count.
    t = targets([row(4, 11.0, 10.0), row(16, 30.0, 5.0), row(64, 40.0, 20.0)])
    assert t["bound"]["batch"] == 64 and t["bound"]["max_possible_speedup"] == pytest.approx(2.0)
    assert t["moe"]["min_speedup_vs_naive_batch_ge_16"] == pytest.approx(3.0)  # 30 / 10 at batch 16
    assert t["moe"]["speedup_target_met"] is True and t["foe"]["speedup_target_met"] is False  # 30/12


def test_machine_rates_are_measured() -> None:
    r = measure_machine(repeats=1, matmul_size=256, copy_mib=4)
    assert r.matmul_gflops > 0.1 and r.copy_gbps > 0.01 and r.threads == torch.get_num_threads()


def test_cli_runs_end_to_end_on_tiny(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    rc = main(["bench", "model", "--preset", "tiny", "--batch-sizes", "1,2,4", "--seq-lens", "5", "--repeats", "2",
               "--threads", "1", "--max-prefill-tokens", "10", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "FoE/MoE" in printed and "targets:" in printed
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["phase"], r["batch"], r["seq_len"]) for r in rows] == [
        ("prefill", 1, 5), ("prefill", 2, 5), ("decode", 1, 5), ("decode", 2, 5), ("decode", 4, 5)]
    assert result["skipped"] == [{"phase": "prefill", "batch": 4, "seq_len": 5}]  # 20 tokens > 10
    for r in rows:
        assert set(r["timings"]) == {"moe", "foe", "naive"}
        for t in r["timings"].values():
            assert 0 < t["p10_ms"] <= t["median_ms"] <= t["p90_ms"]
        assert r["new_tokens"] == (r["batch"] * 5 if r["phase"] == "prefill" else r["batch"])
        assert 0 < r["derived"]["moe_frac_floor"] and r["floor_ms"]["moe"] > 0
        assert r["derived"]["foe_over_moe"] == pytest.approx(r["timings"]["foe"]["median_ms"]
                                                             / r["timings"]["moe"]["median_ms"])
    assert result["machine"]["rates"]["matmul_gflops"] > 0 and set(result["targets"]) == {"moe", "foe"}  # no batch >= 16: no bound
    # the feed-forward layer alone at every token count of the sweep: 5, 10 (prefill) and 1, 2, 4 (decode)
    ffn = result["feed_forward_rows"]
    assert [r["tokens"] for r in ffn] == [1, 2, 4, 5, 10] and "feed-forward layer alone" in printed
    for r in ffn:
        assert set(r["timings"]) == {"moe", "foe", "naive"} and r["floor_ms"]["moe"] > 0
    assert result["settings"]["clock"] in ("wall", "cpu") and result["settings"]["threads"] == 1  # auto resolved
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_settings_are_clear_errors(capsys) -> None:
    with pytest.raises(ValueError, match="phases"):
        ModelBenchConfig(preset="tiny", phases=("train",))
    with pytest.raises(ValueError, match="max_seq_len"):
        ModelBenchConfig(preset="tiny", seq_lens=(256,))
    with pytest.raises(ValueError, match="unknown preset"):
        ModelBenchConfig(preset="huge")
    with pytest.raises(ValueError, match="threads=1"):
        ModelBenchConfig(preset="tiny", clock="cpu")
    assert main(["bench", "model", "--preset", "tiny", "--repeats", "0"]) == 2
    assert "repeats" in capsys.readouterr().err
    assert main(["bench", "model", "--preset", "tiny", "--phases", "prefill", "--batch-sizes", "4",
                 "--seq-lens", "8", "--max-prefill-tokens", "16"]) == 2
    assert "nothing to run" in capsys.readouterr().err


def _experts_and_reference() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, torch.Tensor]:
    """Fast experts, the loop reference with the same weights, and a batch large enough for the fast
    path's expert-by-expert inference branch (one expert gets no row)."""
    from foe.model.experts import STREAM_MIN_ROWS_PER_EXPERT, GroupedExperts
    torch.manual_seed(0)
    fast = GroupedExperts(4, 32, 24, 0.2, 0.2, "grouped_mm")
    slow = GroupedExperts(4, 32, 24, 0.2, 0.2, "loop")
    slow.load_state_dict(fast.state_dict())
    counts = torch.tensor([300, 0, 5, 4 * STREAM_MIN_ROWS_PER_EXPERT - 305])
    return fast, slow, counts, torch.randn(int(counts.sum()), 32)


@pytest.mark.parametrize("mode", ["inference", "no_grad"])
def test_fast_experts_inference_branch_equals_reference(mode: str) -> None:
    """The expert fast path switches to expert-by-expert products for large inference batches (a
    performance edit made for this benchmark): it must equal the loop reference, empty experts included."""
    fast, slow, counts, x = _experts_and_reference()
    with torch.inference_mode() if mode == "inference" else torch.no_grad():
        streamed, ref = fast(x, counts), slow(x, counts)
    with_grad = fast(x, counts)  # grad enabled: the grouped product
    torch.testing.assert_close(streamed, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_grad, ref, atol=1e-5, rtol=1e-5)


def test_fast_experts_inference_branch_under_bf16_autocast() -> None:
    """Validation during `foe train --bf16` runs the inference branch under autocast: its products run
    in bf16, so the output buffer must be bf16 too (it was fp32 and mm's out= refused it)."""
    fast, slow, counts, x = _experts_and_reference()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = fast(x, counts), slow(x, counts)  # the reference loop autocasts each product
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)


def test_bench_runs_models_inputs_and_floor_in_its_dtype() -> None:
    from foe.bench.model_latency import build_models, time_feed_forward, time_shape
    bench = ModelBenchConfig(preset="tiny", batch_sizes=(2,), seq_lens=(5,), repeats=1, clock="wall", dtype="float64")
    models = build_models(bench)
    assert {m.embed.weight.dtype for m in models.values()} == {torch.float64}
    for phase in ("prefill", "decode"):
        timings, _ = time_shape(models, phase, 2, 5, bench)
        assert set(timings) == {"moe", "foe", "naive"}
    assert set(time_feed_forward(models, 4, bench)[0]) == {"moe", "foe", "naive"}
    assert measure_machine(repeats=1, matmul_size=64, copy_mib=1, dtype=torch.float64).matmul_gflops > 0
    with pytest.raises(ValueError, match="dtype"):
        ModelBenchConfig(preset="tiny", dtype="float16")
