"""Fit the `cpu-gloo` preset to measurements on this machine and report predicted against measured.

Inputs: the JSON of measure_cpu.py (gloo collectives, matmuls, copy bandwidth, single-process
forward passes) and, when given, `foe bench forward` JSON (multi-process ep/tp/gp forwards).
Fits, in order:
1. matmul peak = median measured GEMM rate; memory bandwidth = measured copy rate;
2. the gloo link: T = latency + x / bandwidth by least squares weighted by 1/T (relative error),
   where x is the bytes the formulas of collectives.py put on the link (ring all-reduce 2(p-1)/p n,
   all-to-all the bytes leaving a rank); `hop` is folded into latency (2 ranks cannot tell them apart);
3. on forward passes: matmul efficiency (the model's real kernels are slower than one GEMM) and a
   per-layer overhead (norms, routing, gathers the roofline does not count), by least squares on
   T = pure_roofline_compute / efficiency + n_layers x overhead.
4. with `foe bench forward` JSON: matmul efficiency, per-layer overhead and per-collective latency
   again, on the multi-rank ep/tp/gp forwards themselves (fit_on_bench).
Then every measurement is predicted with the fitted cluster and printed beside its measurement
(in-sample: the same points fitted the parameters; docs/cost-model.md says how many).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from foe.config import ModelConfig
from foe.sim.batch import Batch, Segment
from foe.sim.collectives import allreduce, alltoall
from foe.sim.cost_model import ForwardTime, forward_time
from foe.sim.hardware import CALIBRATED_FILE, CLUSTERS, Cluster, Link
from foe.sim.imbalance import RoutingStats, load_routing_stats

MEASURED_FILE = Path(__file__).parent / "data" / "cpu_measured.json"


def _link_bytes(op: str, n: float, p: int) -> float:
    return 2 * (p - 1) / p * n if op == "all_reduce" else n * (p - 1) / p


def fit_link(collectives: list[dict]) -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) from rows {op, ranks, bytes, seconds}."""
    if len(collectives) < 2:
        raise ValueError("need at least two collective measurements to fit latency and bandwidth")
    x = np.array([_link_bytes(c["op"], c["bytes"], c["ranks"]) for c in collectives])
    t = np.array([c["seconds"] for c in collectives])
    A = np.stack([np.ones_like(x), x], 1) / t[:, None]
    (lat, inv_bw), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    lat, inv_bw = max(float(lat), 1e-6), max(float(inv_bw), 1e-12)
    return lat, 1.0 / inv_bw


def fit_a2a_factor(collectives: list[dict], latency: float, bandwidth: float) -> float:
    """All-to-all's bandwidth over the link's, from the all-to-all rows given the link fitted on the
    all-reduces (least squares on the time beyond the latency); 1 when there are no all-to-all rows."""
    rows = [c for c in collectives if c["op"] == "all_to_all"]
    if not rows:
        return 1.0
    x = np.array([_link_bytes("all_to_all", c["bytes"], c["ranks"]) / bandwidth for c in rows])
    y = np.array([max(c["seconds"] - latency, 1e-9) for c in rows])
    return float(np.clip((x @ x) / (x @ y), 0.05, 2.0))


def _predict_collective(c: dict, cluster: Cluster) -> float:
    if c["op"] == "all_reduce":
        return allreduce(c["bytes"], c["ranks"], 1, cluster, "ring")
    return alltoall(c["bytes"] * (c["ranks"] - 1) / c["ranks"], c["ranks"], 1, cluster)


def _forward_batch(row: dict) -> Batch:
    return Batch.prefill(int(row["seqs"]), int(row["seq_len"]))


def _forward_pred(row: dict, cluster: Cluster, routing: RoutingStats) -> float:
    cfg = ModelConfig.from_preset(row["preset"], arch="foe" if row["strategy"] == "gp" else "moe")
    c = cluster.with_nodes(1).replace(devices_per_node=int(row["ranks"]))
    return forward_time(cfg, row["strategy"], c, _forward_batch(row), routing).total


def calibrate(measured: dict, bench_rows: list[dict] | None = None,
              routing: RoutingStats | None = None) -> dict[str, Any]:
    routing = routing or load_routing_stats()
    base = CLUSTERS["cpu-gloo"]
    mm = float(np.median([m["flops_per_s"] for m in measured["compute"]["matmul"]]))
    bw = float(measured["compute"]["copy"]["bytes_per_s"])
    # The link from the all-reduces; all-to-all's own bandwidth as a factor of it (gloo's need not be
    # full duplex). Without two all-reduce sizes, one link from every row.
    reduces = [c for c in measured["collectives"] if c["op"] == "all_reduce"]
    lat, link_bw = fit_link(reduces if len(reduces) >= 2 else measured["collectives"])
    a2a = fit_a2a_factor(measured["collectives"], lat, link_bw) if len(reduces) >= 2 else 1.0
    link = Link(bandwidth=link_bw, efficiency=1.0, latency=lat, hop=0.0)
    c0 = base.replace(matmul_flops=mm, matmul_efficiency=1.0, mem_bandwidth=bw, mem_efficiency=1.0,
                      intra=link, inter=link, layer_overhead=0.0, step_overhead=0.0, a2a_bandwidth_factor=a2a)

    fwd = [r for r in measured.get("forward", []) if r["ranks"] == 1]
    eff, overhead = 1.0, 0.0
    if len(fwd) >= 2:
        pure = np.array([_forward_pred(r, c0, routing) for r in fwd])
        layers = np.array([ModelConfig.from_preset(r["preset"]).n_layers for r in fwd], dtype=float)
        t = np.array([r["seconds"] for r in fwd])
        A = np.stack([pure, layers], 1) / t[:, None]
        (inv_eff, overhead), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
        eff = float(np.clip(1.0 / max(inv_eff, 1e-9), 1e-3, 1.0))
        overhead = max(float(overhead), 0.0)
    cluster = c0.replace(matmul_efficiency=eff, mem_efficiency=eff, layer_overhead=overhead,
                         source=f"fitted by foe sim calibrate to {measured.get('produced_by', 'measurements')}")
    micro = cluster
    if bench_rows:
        cluster = fit_on_bench(micro, bench_rows, routing)
        cluster = cluster.replace(source=cluster.source + " and foe bench forward JSON")

    rows = []
    for c in measured["collectives"]:
        rows.append(dict(kind=c["op"], case=f"{c['ranks']} ranks, {c['bytes']} B",
                         measured=c["seconds"], predicted=_predict_collective(c, micro)))
    for r in fwd:
        rows.append(dict(kind="forward", case=f"{r['preset']} {r['arch']} 1 rank {r['seqs']}x{r['seq_len']}",
                         measured=r["seconds"], predicted=_forward_pred(r, micro, routing)))
    for r in bench_rows or []:
        rows.append(dict(kind=f"bench {r['strategy']}",
                         case=f"{r['preset']} {r['ranks']} ranks {r['mode']} {r['seqs']}x{r['seq_len']}"
                              + (f"@{r['context']}" if r["context"] else ""),
                         measured=r["seconds"], predicted=_bench_pred(r, cluster, routing).total,
                         predicted_micro=_bench_pred(r, micro, routing).total))
    for row in rows:
        row["error"] = row["predicted"] / row["measured"] - 1
        if "predicted_micro" in row:
            row["error_micro"] = row["predicted_micro"] / row["measured"] - 1
    return dict(cluster=cluster.to_dict(), micro_cluster=micro.to_dict(),
                fit=dict(matmul_flops=mm, mem_bandwidth=bw, link_latency_s=lat, link_bandwidth=link_bw,
                         a2a_bandwidth_factor=a2a,
                         matmul_efficiency=eff, layer_overhead_s=overhead,
                         bench_matmul_efficiency=cluster.matmul_efficiency if bench_rows else None,
                         bench_layer_overhead_s=cluster.layer_overhead if bench_rows else None,
                         bench_collective_latency_s=cluster.intra.latency if bench_rows else None),
                rows=rows, routing=routing.source)


def load_bench_rows(path: str | Path) -> list[dict]:
    """Forward measurements from `foe bench forward` JSON (`config` + `results` as written by
    foe.bench.forward): one row per (strategy, mode, batch) with its median latency."""
    try:
        data = json.loads(Path(path).read_text())
        cfg, results = data["config"], data["results"]
        model = {k: v for k, v in cfg["model"].items()}
        rows = []
        for r in results:
            prefill = r["mode"] == "prefill"
            rows.append(dict(strategy=r["strategy"], model=model, preset=cfg["preset"], ranks=int(cfg["nproc"]),
                             ranks_per_node=int(cfg.get("ranks_per_node") or cfg["nproc"] // cfg.get("nnodes", 1)),
                             seqs=int(r["batch"]), seq_len=int(cfg["seq_len"]) if prefill else 1,
                             context=0 if prefill else int(cfg["context_len"]), mode=r["mode"],
                             seconds=float(r["latency_ms_median"]) / 1e3))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not `foe bench forward` JSON: {type(e).__name__} {e}") from None
    if not rows:
        raise ValueError(f"{path}: no forward results")
    return rows


def _bench_pred(row: dict, cluster: Cluster, routing: RoutingStats) -> ForwardTime:
    cfg = ModelConfig.from_dict(row["model"]).replace(arch="foe" if row["strategy"] == "gp" else "moe")
    rpn = row["ranks_per_node"]
    c = cluster.replace(nodes=row["ranks"] // rpn, devices_per_node=rpn)
    return forward_time(cfg, row["strategy"], c, Batch((Segment(row["seqs"], row["seq_len"], row["context"]),)),
                        routing)


def fit_on_bench(cluster: Cluster, rows: list[dict], routing: RoutingStats) -> Cluster:
    """Refit matmul efficiency, per-layer overhead and per-collective latency on multi-rank forwards:
    T = compute / efficiency + n_layers x overhead + calls x latency + bytes / bandwidth, least
    squares weighted by 1/T. Bandwidths stay as measured (these forwards move little data)."""
    bare = cluster.replace(matmul_efficiency=1.0, mem_efficiency=1.0, layer_overhead=0.0, step_overhead=0.0,
                           intra=Link(cluster.intra.bandwidth, 1.0, 0.0, 0.0),
                           inter=Link(cluster.inter.bandwidth, 1.0, 0.0, 0.0))
    A, t = [], []
    for r in rows:
        f = _bench_pred(r, bare, routing)
        comm = f.n_layers * (f.layer.all_to_all + f.layer.all_reduce) + f.final_sync
        calls = f.n_layers * (f.a2a_calls + f.allreduce_calls) + (1 if f.final_sync else 0)
        A.append([f.total - comm, f.n_layers, calls, comm])
        t.append(r["seconds"])
    M, y = np.array(A), np.array(t)
    X = M[:, :3] / y[:, None]
    (inv_eff, overhead, lat), *_ = np.linalg.lstsq(X, 1 - M[:, 3] / y, rcond=None)
    eff = float(np.clip(1 / max(inv_eff, 1e-9), 1e-3, 1.0))
    link = lambda l: Link(l.bandwidth, 1.0, max(float(lat), 0.0), 0.0)  # noqa: E731
    return cluster.replace(matmul_efficiency=eff, mem_efficiency=eff, layer_overhead=max(float(overhead), 0.0),
                           intra=link(cluster.intra), inter=link(cluster.inter))


def save(result: dict, path: Path = CALIBRATED_FILE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path
