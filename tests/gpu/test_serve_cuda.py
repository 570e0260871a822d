"""`foe serve --device cuda`, one process, end to end: an OpenAI client's greedy completions equal
`foe.generate` on the same checkpoint on the GPU."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from foe.generate import generate
from foe.model.checkpoint import save_checkpoint
from foe.tokenizer import byte_level_tokenizer
from tests.conftest import build, tiny
from tests.gpu import CUDA

pytestmark = CUDA

PROMPTS, MAX_TOKENS = ["Hello", "The GPU says", "x"], [12, 7, 20]
SRC = Path(__file__).resolve().parents[2] / "src"


def test_serve_on_cuda_answers_what_generate_computes(tmp_path: Path) -> None:
    model = build(tiny("foe"))
    save_checkpoint(model, tmp_path / "ckpt")
    tok = byte_level_tokenizer()
    want = [tok.decode(generate(model.cuda(), [list(p.encode())], n, stop_token_ids=(256,))[0])
            for p, n in zip(PROMPTS, MAX_TOKENS)]
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "foe.cli.main", "serve", "--checkpoint", str(tmp_path / "ckpt"),
                             "--device", "cuda", "--port", "0"], stdout=subprocess.PIPE, stderr=log, text=True,
                            env={**os.environ, "PYTHONPATH": str(SRC)}, start_new_session=True)
    try:
        banner = proc.stdout.readline()  # printed once the server listens
        m = re.search(r"on http://127\.0\.0\.1:(\d+)\s", banner)
        log.seek(0)
        assert m, f"no banner: {banner!r}\n{log.read()}"
        url = f"http://127.0.0.1:{m.group(1)}"
        got = []
        for prompt, n in zip(PROMPTS, MAX_TOKENS):
            r = httpx.post(url + "/v1/completions", timeout=120,
                           json={"prompt": prompt, "max_tokens": n, "temperature": 0})
            assert r.status_code == 200, r.text
            got.append(r.json()["choices"][0]["text"])
        assert got == want
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its engine core process
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
