"""`foe cluster` for real (as root; skipped with the reason otherwise): the shaped links carry bytes at their
intra- and inter-node rates, a job on every rank counts bytes at the emulated node boundary exactly as a
single-host run labelled with the same layout, and every namespace is gone afterwards, also when the
command fails or the run is stopped by SIGTERM."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from foe.cluster.netns import check_permitted, namespaces
from foe.cluster.topology import ClusterSpec
from tests.bench.test_forward_multinode import SWEEP, _bytes
from tests.engine.test_multinode import _skip_reason

ROOT = Path(__file__).resolve().parents[2]
_names = itertools.count()


@pytest.fixture
def name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """A cluster name of this test alone; whatever it left is deleted afterwards."""
    if reason := _skip_reason():
        pytest.skip(reason)
    monkeypatch.setenv("FOE_CLUSTER_STATE", str(tmp_path / "state"))
    n = f"t{os.getpid() % 10000}x{next(_names)}"
    yield n
    subprocess.run(_foe("cluster", "down", "--name", n), env=_env(tmp_path), capture_output=True, timeout=60)
    assert not namespaces(f"{n}-")


def _foe(*args: str) -> list[str]:
    return [sys.executable, "-m", "foe.cli.main", *args]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
            "FOE_CLUSTER_STATE": str(tmp_path / "state")}


SEND = """
import socket, sys, time
n = int(sys.argv[2])
s = socket.create_connection((sys.argv[1], 5001))
t = time.perf_counter()
s.sendall(b"x" * n)
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(time.perf_counter() - t)
"""
RECV = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5001))
s.listen(1)
while True:
    c, _ = s.accept()
    while c.recv(1 << 20):
        pass
    c.sendall(b"k")
    c.close()
"""


def test_links_carry_bytes_at_their_rates_and_down_is_idempotent(name: str, tmp_path: Path) -> None:
    env = _env(tmp_path)
    up = subprocess.run(_foe("cluster", "up", "--name", name, "--nodes", "2", "--ranks-per-node", "2",
                             "--intra-mbit", "200", "--inter-mbit", "20"), env=env, capture_output=True, text=True,
                        timeout=120)
    assert up.returncode == 0, up.stderr
    spec = ClusterSpec(name=name, nodes=2, ranks_per_node=2)
    assert sorted(namespaces(f"{name}-")) == sorted([spec.fabric_ns, *(spec.rank_ns(r) for r in range(4))])
    again = subprocess.run(_foe("cluster", "up", "--name", name), env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already exist" in again.stderr

    receivers = [subprocess.Popen(["ip", "netns", "exec", spec.rank_ns(r), sys.executable, "-c", RECV])
                 for r in (1, 2)]
    try:
        time.sleep(1.0)
        n = 400_000  # bytes: 3.2 Mbit, 16 ms at 200 Mbit/s and 160 ms at 20 Mbit/s
        for dst, mbit in ((1, 200), (2, 20)):
            best = min(float(subprocess.run(["ip", "netns", "exec", spec.rank_ns(0), sys.executable, "-c", SEND,
                                             spec.address(dst), str(n)], capture_output=True, text=True,
                                            timeout=60, check=True).stdout) for _ in range(3))
            want = n * 8 / (mbit * 1e6)
            # payload over a shaped rate that also carries TCP/IP headers (~3%): a little slower, never faster
            assert want * 0.97 < best < want * 1.3, f"rank 0 -> {dst}: {best * 1e3:.1f} ms, {want * 1e3:.1f} ms at {mbit} Mbit/s"
    finally:
        for p in receivers:
            p.kill()
            p.wait()
    status = subprocess.run(_foe("cluster", "status", "--name", name), env=env, capture_output=True, text=True,
                            timeout=60)
    assert status.returncode == 0 and "inter sent" in status.stdout, status.stdout + status.stderr

    for expected in (f"deleted {4 + 1} namespace(s)", "nothing to delete"):
        down = subprocess.run(_foe("cluster", "down", "--name", name), env=env, capture_output=True, text=True,
                              timeout=60)
        assert down.returncode == 0 and expected in down.stdout, down.stdout + down.stderr
    assert not namespaces(f"{name}-")


def test_a_job_on_every_rank_counts_bytes_at_the_emulated_nodes(name: str, tmp_path: Path) -> None:
    out = tmp_path / "cl"
    r = subprocess.run(_foe("cluster", "run", "--name", name, "--nodes", "2", "--ranks-per-node", "2",
                            "--inter-mbit", "100", "--", "foe", "bench", "forward", *SWEEP, "--out", str(out)),
                       env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not namespaces(f"{name}-")
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["machine"]["hosts"] == [f"{name} node {k}" for k in (0, 0, 1, 1)]
    labelled = tmp_path / "labelled"
    r = subprocess.run(_foe("bench", "forward", *SWEEP, "--nproc", "4", "--ranks-per-node", "2", "--out",
                            str(labelled)), env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _bytes(result) == _bytes(json.loads(labelled.with_suffix(".json").read_text()))


def test_a_failing_command_or_sigterm_still_tears_down(name: str, tmp_path: Path) -> None:
    env = _env(tmp_path)
    r = subprocess.run(_foe("cluster", "run", "--name", name, "--nodes", "2", "--", sys.executable, "-c",
                            "import os, sys; sys.exit(3 if os.environ['RANK'] == '1' else 0)"),
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "rank 1 (" in r.stderr and "exited with code 3" in r.stderr, r.stderr
    assert not namespaces(f"{name}-")

    proc = subprocess.Popen(_foe("cluster", "run", "--name", name, "--nodes", "2", "--", "sleep", "60"), env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(namespaces(f"{name}-n")) < 2 or not any(
            subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.strip()
            for ns in namespaces(f"{name}-n")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert not namespaces(f"{name}-")


def test_without_root_it_refuses_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ValueError, match="needs root"):
        check_permitted()


@pytest.mark.parametrize("kw,msg", [(dict(name="Bad-Name"), "lower-case"), (dict(nodes=0), "nodes"),
                                    (dict(inter_mbit=0), "rate"), (dict(mtu=100), "mtu")])
def test_impossible_clusters_are_refused(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        ClusterSpec(**kw)


def test_scaled_rates_follow_the_rule() -> None:
    """rate x q x t_here = the activations moved, for both links; q is the H100 one at the printed figures."""
    from foe.cluster.scaling import Shape, h100_layer_seconds, scaled_to_h100
    from foe.sim.hardware import CLUSTERS
    shape = Shape("prefill", 2, 32)
    r = scaled_to_h100("tiny", shape, ranks=2, t_here=1e-3)
    T = shape.tokens
    t_h100 = h100_layer_seconds(shape, CLUSTERS["h100"].matmul_efficiency)
    for rate, link in ((r.intra_mbit, CLUSTERS["h100"].intra), (r.inter_mbit, CLUSTERS["h100"].inter)):
        q = (T * 2048 * 2 / link.bw) / t_h100  # the 7b preset: d_model 2048, bf16
        assert rate * 1e6 / 8 * q * 1e-3 == pytest.approx(T * 64 * 4, rel=1e-9)  # tiny: d_model 64, fp32
    assert r.intra_mbit / r.inter_mbit == pytest.approx(CLUSTERS["h100"].intra.bw / CLUSTERS["h100"].inter.bw)
    assert r.quotient(r.inter_mbit) == pytest.approx((T * 2048 * 2 / CLUSTERS["h100"].inter.bw) / t_h100)
    assert r.band["inter"][0] <= r.inter_mbit <= r.band["inter"][1]
    assert any("t_here = 1.000 ms" in line for line in r.arithmetic)


def test_a_sweep_runs_every_factor_and_tears_down(tmp_path: Path) -> None:
    if reason := _skip_reason():
        pytest.skip(reason)
    out = tmp_path / "sw"
    r = subprocess.run(_foe("cluster", "sweep", "--preset", "tiny", "--factors", "0.5,2", "--repeats", "1",
                            "--seqs", "2", "--length", "16", "--out", str(out)), env=_env(tmp_path),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((out / "crossover.json").read_text())
    low, high = sorted(result["points"], key=lambda p: p["factor"])
    assert high["inter_mbit"] == pytest.approx(4 * low["inter_mbit"])
    assert low["q"] == pytest.approx(4 * high["q"])
    for p in (low, high):
        assert set(p["measured_ratio"]) == set(p["predicted_ratio"]) == {"ep", "tp"}
        assert p["bytes_inter"]["gp"] > 0
    assert (out / "crossover.png").stat().st_size > 10_000
    assert not namespaces("foesw-")


def test_a_driver_runs_once_in_rank_0s_namespace(name: str, tmp_path: Path) -> None:
    """--driver: one process, in rank 0's namespace (its address is 10.79.0.1), with FOE_CLUSTER naming the
    cluster, which `foe bench compare --cluster` reads to start its servers as jobs on every rank."""
    probe = ("import os, socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(('10.79.1.1', 9)); "
             "print(os.environ['FOE_CLUSTER'], s.getsockname()[0])")
    r = subprocess.run(_foe("cluster", "run", "--name", name, "--nodes", "2", "--driver", "--", sys.executable, "-c",
                            probe), env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [name, "10.79.0.1"]
    assert not namespaces(f"{name}-")
