"""foe.device's clock for timing device work, and the accounted collectives' times that use it (on the CPU;
the CUDA synchronisation is checked by standing in for torch.cuda.synchronize)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

import foe.parallel.comm
from foe.device import synced_clock
from foe.parallel.comm import Comm, Group
from foe.placement import ParallelDims


def test_synced_clock_is_the_plain_clock_on_the_cpu() -> None:
    clock = lambda: 1.0  # noqa: E731
    assert synced_clock("cpu", clock) is clock


def test_synced_clock_waits_for_the_gpu_before_every_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(f"sync {device}"))
    ticks = itertools.count()

    def clock() -> float:
        events.append("read")
        return float(next(ticks))

    timed = synced_clock("cuda:1", clock)
    assert (timed(), timed()) == (0.0, 1.0)
    assert events == ["sync cuda:1", "read", "sync cuda:1", "read"]


@pytest.fixture
def solo_comm() -> Iterator[Comm]:
    """A Comm in a one-process gloo world whose groups are that world: its collectives really run and
    are accounted, with no second process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        comm = Comm(ParallelDims(), rank=0)
        comm.groups["pair"] = Group("pair", [0, 1], dist.group.WORLD)  # size 2: all_reduce does not skip it
        comm.groups["solo"] = Group("solo", [0], dist.group.WORLD)
        yield comm
    finally:
        dist.destroy_process_group()


def test_accounted_collectives_record_their_time(solo_comm: Comm, monkeypatch: pytest.MonkeyPatch) -> None:
    clocked_on: list[torch.device] = []  # the devices whose synced clock timed a collective
    monkeypatch.setattr(foe.parallel.comm, "synced_clock",
                        lambda device: clocked_on.append(device) or synced_clock(device))
    x = torch.arange(6.0).view(3, 2)
    assert torch.equal(solo_comm.all_reduce(x, "pair", layer=0, site="attn"), x)
    assert torch.equal(solo_comm.all_to_all(x, [3], [3], "solo", layer=0, site="dispatch"), x)
    recs = solo_comm.ledger.records
    assert [(r.op, r.site) for r in recs] == [("all_reduce", "attn"), ("all_to_all", "dispatch")]
    assert all(r.seconds > 0 for r in recs)
    summary = solo_comm.ledger.summary()["ops"]
    assert summary["all_reduce"]["calls"] == 1 and summary["all_reduce"]["seconds"] == recs[0].seconds
    assert clocked_on == [x.device, x.device]  # a CUDA tensor's collective would be timed between syncs

    solo_comm.ledger.enabled = False  # a timed benchmark run: nothing recorded, nothing synchronised
    solo_comm.all_reduce(x, "pair", layer=1, site="attn")
    assert len(solo_comm.ledger.records) == 2 and len(clocked_on) == 2
