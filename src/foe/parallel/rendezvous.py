"""Where the ranks of a job meet (`Rendezvous`, torchrun's conventions) and the host facts that go with it:
free ports, this host's address facing the master, the network interface gloo should use, threads per rank.
No process is started here (that is `launch.py`)."""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, replace

import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of one job meet, and this node's place in it, with torchrun's conventions: `nnodes`
    nodes of `nproc` ranks each, global rank = node_rank * nproc + local rank. Rank 0 (on node 0) hosts the
    TCPStore on master_port of every interface; the other nodes reach it at master_addr. `timeout_s` bounds
    every wait for another rank: the rendezvous, and each collective."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: any free port, on one node only
    timeout_s: float = 60.0
    device: str = "cpu"  # cpu or cuda (each rank takes the GPU of its local rank); see foe.device
    torchrun: bool = False  # the ranks were started by torchrun, whose agent hosts the store (env:// init)
    # Node 0's launcher process hosts the store and the ranks join as its clients (run_ranks), rather than
    # rank 0 hosting it (foe serve, where rank 0 is the supervisor): the store then outlives any rank, and
    # a death reported there can still be read after rank 0 has gone.
    launcher_store: bool = False

    def __post_init__(self) -> None:
        if self.nproc < 1 or self.nnodes < 1:
            raise ValueError("nproc and nnodes must be >= 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node rank must be in 0..{self.nnodes - 1}, got {self.node_rank}")
        if self.nnodes > 1 and self.master_port == 0:
            raise ValueError("several nodes need a fixed master port (the other nodes must know it)")
        if self.timeout_s <= 0:
            raise ValueError(f"the rendezvous timeout must be > 0 s, got {self.timeout_s}")

    @classmethod
    def from_env(cls, timeout_s: float = 60.0, device: str = "cpu") -> Rendezvous | None:
        """The job torchrun (or any launcher with its variables) started this process in, or None outside one.
        This process is one rank: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK (the node),
        MASTER_ADDR, MASTER_PORT."""
        env = os.environ
        if "RANK" not in env:
            return None
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            # Without LOCAL_WORLD_SIZE (a launcher that starts one process per host or pod), each rank is
            # its own node.
            nproc = int(env.get("LOCAL_WORLD_SIZE", 1))
            node = int(env.get("GROUP_RANK", rank // nproc))
            local = int(env.get("LOCAL_RANK", rank - node * nproc))
            rdzv = cls(nproc=nproc, nnodes=world // nproc, node_rank=node, master_addr=env["MASTER_ADDR"],
                       master_port=int(env["MASTER_PORT"]), timeout_s=timeout_s, device=device, torchrun=True)
        except (KeyError, ValueError, ZeroDivisionError) as e:
            raise ValueError(f"RANK is set, but torchrun's other variables are missing or malformed ({e!r}): "
                             f"need WORLD_SIZE, MASTER_ADDR and MASTER_PORT") from None
        if rdzv.world_size != world:
            raise ValueError(f"WORLD_SIZE {world} is not a multiple of LOCAL_WORLD_SIZE {nproc}: foe needs the "
                             f"same number of ranks on every node")
        if rdzv.local_rank(rank) != local:
            raise ValueError(f"RANK {rank}, LOCAL_RANK {local}, LOCAL_WORLD_SIZE {nproc} and GROUP_RANK {node} "
                             f"disagree: foe needs global rank = node x ranks per node + local rank, as torchrun "
                             f"numbers them")
        return rdzv

    @staticmethod
    def env_rank() -> int:
        """This process's global rank under torchrun (RANK)."""
        return int(os.environ["RANK"])

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc

    @property
    def local_ranks(self) -> range:
        return range(self.node_rank * self.nproc, (self.node_rank + 1) * self.nproc)

    def local_rank(self, rank: int) -> int:
        return rank - self.node_rank * self.nproc

    @property
    def endpoint(self) -> str:
        return f"{self.master_addr}:{self.master_port}"

    def with_port(self) -> Rendezvous:
        """This rendezvous with a concrete port (a free one when 0)."""
        return self if self.master_port else replace(self, master_port=free_port())

    def host(self) -> str:
        """This node, for messages: its address facing the master (namespaces share one hostname)."""
        addr = local_address(self.master_addr)
        return f"{socket.gethostname()} ({addr})" if addr else socket.gethostname()

    def check_hint(self) -> str:
        if self.torchrun:
            return (f"check that torchrun was started on every node with the same --nnodes {self.nnodes}, "
                    f"--nproc-per-node {self.nproc} and rendezvous endpoint, that its MASTER_ADDR:MASTER_PORT "
                    f"({self.endpoint}) is reachable from every node, and that no firewall blocks it")
        return (f"check that node 0 runs `foe serve ... --nnodes {self.nnodes} --node-rank 0 --master-port "
                f"{self.master_port}`, that every other node runs the same command with its --node-rank and "
                f"--master-addr {self.master_addr}, that {self.endpoint} is "
                f"node 0's address and port as seen from the other nodes, and that no firewall blocks it "
                f"(--dist-timeout sets this wait)")


def threads_per_rank(local_ranks: int) -> int:
    """Threads for each of `local_ranks` processes on this host: OMP_NUM_THREADS when set (as
    torchrun sets it), else the cores shared out. Several ranks spinning on more threads than cores slow
    every collective down."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else max(1, (os.cpu_count() or 1) // local_ranks)


def local_address(peer: str) -> str | None:
    """This host's IPv4 address on the route to `peer` (no packet is sent), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def interface_of(addr: str) -> str | None:
    """The name of the network interface holding the IPv4 address `addr` (Linux), or None."""
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            if socket.inet_ntoa(raw[20:24]) == addr:
                return name
    return None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def pick_gloo_interface(rdzv: Rendezvous) -> None:
    """Gloo advertises the address its hostname resolves to, else loopback: wrong on a host whose hostname
    is not its address on the job's network. Use the interface that routes to the master instead (unless
    GLOO_SOCKET_IFNAME is set), whenever the master is not on loopback: ranks of one node may sit in
    network namespaces of their own (`foe cluster`)."""
    if "GLOO_SOCKET_IFNAME" not in os.environ and not _is_loopback(rdzv.master_addr):
        iface = interface_of(local_address(rdzv.master_addr) or "")
        if iface:
            os.environ["GLOO_SOCKET_IFNAME"] = iface


def host_store(rdzv: Rendezvous) -> dist.TCPStore:
    """The job's store, served from this process (node 0's launcher) on master_port of every interface."""
    try:
        return dist.TCPStore(rdzv.master_addr, rdzv.master_port, is_master=True, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=rdzv.timeout_s))
    except (RuntimeError, OSError) as e:
        raise ConnectionError(f"cannot serve the rendezvous on port {rdzv.master_port} ({one_line(e)}); is "
                              f"another job using it? Choose another --master-port") from e


def connect_store(rdzv: Rendezvous) -> dist.TCPStore:
    """A client of rank 0's TCPStore (a node's supervisor uses it to report and to notice the job ending);
    ConnectionError saying what to check when it cannot be reached within the timeout."""
    try:
        return dist.TCPStore(rdzv.master_addr, rdzv.master_port, is_master=False,
                             timeout=datetime.timedelta(seconds=rdzv.timeout_s))
    except (RuntimeError, TimeoutError, OSError) as e:
        raise ConnectionError(f"cannot reach node 0's rendezvous at {rdzv.endpoint} within {rdzv.timeout_s:g} s "
                              f"({one_line(e)}); {rdzv.check_hint()}") from e


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


