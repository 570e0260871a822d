"""Starting and stopping `foe serve` for a benchmark, and reading its Prometheus /metrics.

A `ServerProcess` runs `python -m foe.cli.main serve ...` in its own session (process group). It
is stopped by its context manager, at interpreter exit (atexit) and on SIGTERM/SIGHUP (turned into
SystemExit so the same clean-up runs); Ctrl-C raises KeyboardInterrupt in the benchmark, which also
leaves the context manager. Stopping sends SIGTERM to the server (which stops its own ranks), then
SIGKILL to whatever is left in its group. Output goes to a log file whose tail is shown if the
server fails to come up. Servers bind to 127.0.0.1 only.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from foe.parallel.launch import free_port

_LIVE: set["ServerProcess"] = set()


def _stop_all() -> None:
    for srv in list(_LIVE):
        srv.stop()


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the context managers, then atexit


_handlers_installed = False


def _install_handlers() -> None:
    global _handlers_installed
    if _handlers_installed:
        return
    atexit.register(_stop_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _on_signal)
    _handlers_installed = True


class ServerProcess:
    """`foe serve <args>` on a free port of 127.0.0.1; `with ServerProcess(...) as srv: srv.url`."""

    def __init__(self, serve_args: list[str], log_path: str | Path, port: int | None = None,
                 ready_timeout_s: float = 300.0, launcher: list[str] | None = None) -> None:
        """launcher: a command that starts `foe serve` on its ranks (e.g. `foe cluster job --`); by default
        it starts them itself."""
        self.port = port or free_port()
        self.cmd = [*(launcher or []), sys.executable, "-m", "foe.cli.main", "serve", *serve_args,
                    "--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path = Path(log_path)
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerProcess":
        _install_handlers()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            # Its own process group (killpg stops it with its children) but not its own session: with
            # sched_autogroup each session gets one CPU share, which would throttle the server against the
            # load generator and whatever else runs, and make one server's timings depend on that.
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         process_group=0)
        _LIVE.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"`{' '.join(self.cmd)}` exited with code {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not ready after {self.ready_timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the server (which stops its own ranks), then SIGKILL to its whole process group."""
        _LIVE.discard(self)
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of its group (a hung rank, or the server itself)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- Prometheus text format ---------------------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_prometheus(text: str) -> dict[str, float]:
    """Samples by name (labels kept in the key, e.g. 'x_bucket{le="0.1"}'); comments skipped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if (m := _SAMPLE.match(line.strip())) is not None:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def histogram_delta(before: dict[str, float], after: dict[str, float], name: str) -> tuple[float, int]:
    """(sum, count) of a histogram's observations between two scrapes."""
    return (after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0),
            int(after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)))


def scrape(base_url: str) -> dict[str, float]:
    r = httpx.get(base_url.rstrip("/") + "/metrics", timeout=10.0)
    r.raise_for_status()
    return parse_prometheus(r.text)
