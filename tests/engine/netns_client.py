"""Run inside a network namespace (`ip netns exec NS python tests/engine/netns_client.py ...`): the test
process cannot reach a server bound there.

  complete URL PROMPTS_JSON MAX_TOKENS_JSON  wait for /health, then greedy completions with the openai
                                             client, concurrently; prints their texts as JSON
  health URL                                 print /health's status every 50 ms ("down" when refused)
                                             until the server has gone, or 60 s
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx


def wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not become healthy")


def complete(url: str, prompts: list[str], max_tokens: list[int]) -> list[str]:
    from openai import OpenAI
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id

    def one(i: int) -> str:
        r = client.completions.create(model=model, prompt=prompts[i], max_tokens=max_tokens[i], temperature=0)
        return r.choices[0].text
    with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent: ep spreads them over the ranks
        return list(pool.map(one, range(len(prompts))))


def health(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            print(httpx.get(url + "/health", timeout=1).status_code, flush=True)
        except httpx.HTTPError:
            print("down", flush=True)
            return
        time.sleep(0.05)


if __name__ == "__main__":
    mode, url, *rest = sys.argv[1:]
    if mode == "complete":
        wait_healthy(url)
        print(json.dumps(complete(url, json.loads(rest[0]), json.loads(rest[1]))))
    else:
        health(url)
