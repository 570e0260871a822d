"""`foe serve --nnodes 2` across two real hosts: Linux network namespaces, each with its own address
(10.77.0.1 and 10.77.0.2 on a veth pair) and its own loopback, so traffic goes only between them. Node 0
serves the API inside its namespace; node 1 only runs ranks. Checks: greedy text over the openai client
equals the single-process model, a rank killed on either host gives 503 and every process on both hosts
exits, and a wrong master address or a missing peer fails within --dist-timeout saying what to check.

Needs root (`ip netns add`); skipped with the reason otherwise. Every namespace is deleted, and every
process in it killed, after each test even when it fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from foe.generate import generate
from foe.model.checkpoint import save_checkpoint
from foe.tokenizer import byte_level_tokenizer
from tests.conftest import build, tiny
from tests.engine.test_distributed_server import MAX_TOKENS, PROMPTS, children, worker_ranks

ROOT = Path(__file__).resolve().parents[2]
CLIENT = str(ROOT / "tests" / "engine" / "netns_client.py")
ADDRS = ("10.77.0.1", "10.77.0.2")
API = "http://127.0.0.1:8000"  # node 0's API, on its namespace's loopback
_runs = iter(range(1000))


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns add)"
    probe = f"foeprobe{os.getpid()}"
    try:
        r = _ip("netns", "add", probe)
    except FileNotFoundError:
        return "the `ip` command (iproute2) is not installed"
    if r.returncode:
        return f"ip netns add is not permitted here: {r.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


@pytest.fixture
def hosts() -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth pair (unique names per test run); torn down even when the test fails."""
    if reason := _skip_reason():
        pytest.skip(reason)
    tag = f"foe{os.getpid()}n{next(_runs)}"
    names = (f"{tag}a", f"{tag}b")
    links = (f"{tag}x", f"{tag}y")  # interface names: at most 15 characters
    try:
        for ns in names:
            _check(_ip("netns", "add", ns))
        _check(_ip("link", "add", links[0], "type", "veth", "peer", "name", links[1]))
        for ns, link, addr in zip(names, links, ADDRS):
            _check(_ip("link", "set", link, "netns", ns))
            _check(_ip("-n", ns, "addr", "add", f"{addr}/24", "dev", link))
            _check(_ip("-n", ns, "link", "set", link, "up"))
            _check(_ip("-n", ns, "link", "set", "lo", "up"))
        yield names
    finally:
        for ns in names:
            for pid in _ip("netns", "pids", ns).stdout.split():
                _kill(int(pid))
            _ip("netns", "del", ns)  # deletes its end of the veth pair, and so the pair


def _check(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, f"{r.args}: {r.stderr}"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def start_node(ns: str, node_rank: int, log: Path, *args: str, master: str = ADDRS[0]) -> subprocess.Popen:
    """`foe serve --nnodes 2 --node-rank k` inside namespace `ns` (ip execs it: the pid is foe's)."""
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "foe.cli.main", "serve", *args, "--nnodes", "2",
           "--node-rank", str(node_rank), "--master-addr", master, "--master-port", "29500",
           "--num-blocks", "64", "--block-size", "4", "--max-num-batched-tokens", "16"]
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)


def in_ns(ns: str, *args: str, **kw) -> subprocess.Popen:  # noqa: ANN003
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, CLIENT, *args], stdout=subprocess.PIPE,
                            text=True, env=_env(), **kw)


def expected(arch: str, ckpt: Path) -> list[str]:
    """The single-process greedy text of a tiny random model, saved to `ckpt` for the nodes to load."""
    model = build(tiny(arch))
    save_checkpoint(model, ckpt)
    tok = byte_level_tokenizer()
    return [tok.decode(generate(model, [list(p.encode())], n, stop_token_ids=(256,))[0])
            for p, n in zip(PROMPTS, MAX_TOKENS)]


def served_text(ns0: str, nodes: list[subprocess.Popen], logs: list[Path]) -> list[str]:
    client = in_ns(ns0, "complete", API, json.dumps(PROMPTS), json.dumps(MAX_TOKENS))
    deadline = time.monotonic() + 120
    try:
        while client.poll() is None:  # fail as soon as a node exits, rather than when the client gives up
            assert all(n.poll() is None for n in nodes), _logs(logs)
            assert time.monotonic() < deadline, _logs(logs)
            time.sleep(0.2)
        out = client.stdout.read() if client.stdout else ""
    finally:
        client.kill()
    assert client.returncode == 0, _logs(logs)
    assert all(n.poll() is None for n in nodes), _logs(logs)
    return json.loads(out)


def kill_and_watch(ns0: str, victim: int, nodes: list[subprocess.Popen], busy: bool = False) -> set[str]:
    """SIGKILL `victim` while polling node 0's /health from inside ns0 (busy: while requests are being
    generated, so that rank 0 is inside a collective when its peer dies); the statuses seen until it went."""
    load = None
    if busy:
        load = in_ns(ns0, "complete", API, json.dumps(PROMPTS * 2), json.dumps([200] * 2 * len(PROMPTS)),
                     stderr=subprocess.DEVNULL)
        time.sleep(1.5)
    poller = in_ns(ns0, "health", API)
    assert poller.stdout is not None
    assert poller.stdout.readline().strip() == "200"
    os.kill(victim, signal.SIGKILL)
    out, _ = poller.communicate(timeout=60)
    for node in nodes:
        node.wait(timeout=30)  # every process exits: none hangs
    if load is not None:
        load.kill()
        load.wait()
    return set(out.split())


def _left_in(ns: str, wait_s: float = 10.0) -> list[str]:
    """The processes still running in `ns` after up to wait_s (multiprocessing's resource tracker, say,
    exits a moment after its parent)."""
    deadline = time.monotonic() + wait_s
    while (pids := _ip("netns", "pids", ns).stdout.split()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [f"{pid}: {_cmdline(pid)}" for pid in pids]


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def _logs(logs: list[Path]) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in logs)


@pytest.mark.parametrize("arch,strategy", [("foe", "gp"), ("moe", "ep")])
def test_two_hosts_serve_the_single_process_text_and_stop_together(hosts: tuple[str, str], tmp_path: Path,
                                                                   arch: str, strategy: str) -> None:
    want = expected(arch, tmp_path / "ckpt")
    model = ("--checkpoint", str(tmp_path / "ckpt"), "--strategy", strategy)
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    nodes = [start_node(hosts[k], k, logs[k], *model) for k in (0, 1)]
    assert served_text(hosts[0], nodes, logs) == want

    # Kill node 1's rank while it generates: node 0's API answers 503, then every process on both hosts exits.
    (rank1,) = children(nodes[1].pid)
    statuses = kill_and_watch(hosts[0], rank1, nodes, busy=True)
    assert "503" in statuses and "down" in statuses, statuses
    assert nodes[0].returncode != 0 and nodes[1].returncode != 0
    for log in logs:  # both name the rank and its host
        assert f"worker rank 1 (pid {rank1}) on" in log.read_text() and ADDRS[1] in log.read_text(), _logs(logs)
    assert not _left_in(hosts[1]), f"outlived the job on node 1: {_left_in(hosts[1])}"


def test_two_hosts_of_two_ranks_and_a_dead_rank_on_node_0(hosts: tuple[str, str], tmp_path: Path) -> None:
    want = expected("foe", tmp_path / "ckpt")
    # gp with 2 ranks per group: each node holds one FoE group (all-to-all inside it, all-reduce across)
    model = ("--checkpoint", str(tmp_path / "ckpt"), "--strategy", "gp", "--nproc", "2", "--ranks-per-group", "2")
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    nodes = [start_node(hosts[k], k, logs[k], *model) for k in (0, 1)]
    assert served_text(hosts[0], nodes, logs) == want
    assert "gp on 4 rank(s), 2 node(s) of 2" in logs[0].read_text()

    (rank1,) = worker_ranks(nodes[0].pid)  # node 0's worker rank
    statuses = kill_and_watch(hosts[0], rank1, nodes)
    assert "503" in statuses and "down" in statuses, statuses
    assert f"worker rank 1 (pid {rank1}) on" in logs[0].read_text(), _logs(logs)
    node1 = logs[1].read_text()  # names the first death, or that node 0 went away (whichever it saw first)
    assert nodes[1].returncode != 0 and (f"worker rank 1 (pid {rank1}) on" in node1 or "is gone" in node1), node1
    for ns in hosts:
        assert not _left_in(ns), f"outlived the job in {ns}: {_left_in(ns)}"


def test_a_wrong_master_address_or_a_missing_peer_fails_within_the_timeout(hosts: tuple[str, str],
                                                                          tmp_path: Path) -> None:
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    args = ("--preset", "tiny", "--arch", "foe", "--strategy", "gp", "--dist-timeout", "3")
    t0 = time.monotonic()
    nodes = [start_node(hosts[0], 0, logs[0], *args),  # waits for node 1, which looks elsewhere
             start_node(hosts[1], 1, logs[1], *args, master="10.77.0.9")]
    for node in nodes:
        node.wait(timeout=40)
    took = time.monotonic() - t0
    assert all(n.returncode != 0 for n in nodes), _logs(logs)
    assert took < 30, f"took {took:.0f} s"  # 3 s of waiting, plus starting Python and torch on a busy machine
    node0, node1 = (log.read_text() for log in logs)
    assert "rank 0 could not join the 2 ranks at 10.77.0.1:29500 within 3 s" in node0, node0
    assert "cannot reach node 0's rendezvous at 10.77.0.9:29500 within 3 s" in node1, node1
    for text in (node0, node1):
        assert "no firewall blocks it" in text and "--node-rank" in text
