"""`foe bench forward --nnodes 2` across two real hosts (network namespaces joined by a veth pair, from
tests/engine/test_multinode.py): the byte counts split intra/inter node at the real host boundary equal
the single-host run that labels the same layout with --ranks-per-node, and a rank killed on node 1 stops
the job on both hosts with an error naming the rank and its host. Needs root; skipped otherwise."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.engine.test_distributed_server import children
from tests.engine.test_multinode import ADDRS, ROOT, _env, _left_in, _logs, hosts  # noqa: F401 (fixture)

SWEEP = ("--preset", "tiny", "--strategies", "ep,gp", "--ranks-per-group", "2", "--batch-sizes", "2,5",
         "--seq-len", "8", "--context-len", "16", "--warmup", "1", "--repeats", "2")


def _node(ns: str, node_rank: int, log: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "foe.cli.main", "bench", "forward", *SWEEP,
           "--nproc", "2", "--nnodes", "2", "--node-rank", str(node_rank), "--master-addr", ADDRS[0],
           "--master-port", "29500", "--dist-timeout", "30", "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)


def _bytes(result: dict) -> dict:
    return {(r["strategy"], r["mode"], r["batch"]): (r["bytes_per_token_per_layer_intra"],
                                                     r["bytes_per_token_per_layer_inter"])
            for r in result["results"]}


def test_two_hosts_count_bytes_at_the_real_boundary(hosts: tuple[str, str], tmp_path: Path) -> None:
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    nodes = [_node(hosts[k], k, logs[k], tmp_path / "real") for k in (0, 1)]
    for node in nodes:
        node.wait(timeout=300)
    assert [n.returncode for n in nodes] == [0, 0], _logs(logs)
    real = json.loads((tmp_path / "real.json").read_text())
    assert not (tmp_path / "real.png").exists() or (tmp_path / "real.png").stat().st_size > 0
    assert real["machine"]["hosts"] == [f"{h} ({a})" for a in ADDRS for h in [real["machine"]["hosts"][0].split()[0]] * 2]
    assert real["config"]["nnodes"] == 2

    labelled = tmp_path / "labelled"
    r = subprocess.run([sys.executable, "-m", "foe.cli.main", "bench", "forward", *SWEEP, "--nproc", "4",
                        "--ranks-per-node", "2", "--out", str(labelled)], env=_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    want = _bytes(json.loads(labelled.with_suffix(".json").read_text()))
    assert _bytes(real) == want
    # FoE's all-reduce crosses hosts; expert parallelism's all-to-all stays within each one's group here
    assert all(inter > 0 for (s, _, _), (_, inter) in want.items() if s == "gp")
    assert all(inter > 0 for (s, _, _), (_, inter) in want.items() if s == "ep")


def test_a_rank_killed_on_node_1_stops_both_hosts_naming_it(hosts: tuple[str, str], tmp_path: Path) -> None:
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    long = ("--repeats", "400", "--batch-sizes", "8")
    nodes = [_node(hosts[k], k, logs[k], tmp_path / "out", *long) for k in (0, 1)]
    deadline = time.monotonic() + 120
    while len(ranks := children(nodes[1].pid)) < 2 or "bench forward" not in logs[0].read_text(errors="replace"):
        assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), _logs(logs)
        time.sleep(0.2)
    time.sleep(1.0)  # into the timed repeats
    victim = min(ranks)
    os.kill(victim, signal.SIGKILL)
    for node in nodes:
        node.wait(timeout=60)  # neither hangs in a collective
    assert nodes[0].returncode != 0 and nodes[1].returncode != 0, _logs(logs)
    node0 = logs[0].read_text(errors="replace")
    assert f"(pid {victim}) on" in node0 and ADDRS[1] in node0 and "died" in node0, _logs(logs)
    for ns in hosts:
        assert not _left_in(ns), f"outlived the job in {ns}: {_left_in(ns)}"
