"""Ask vLLM's OpenAI server and `foe serve` the same completions with the `openai` client; print the
greedy texts and the largest top-5 logprob difference. Both servers must already be running.

    python tests/vllm/compare_servers.py http://127.0.0.1:8100/v1 http://127.0.0.1:8101/v1 "And God said" ...

A script for docs/vllm.md's server figures (the tests use vLLM's offline engine, which starts faster).
"""

from __future__ import annotations

import sys


def complete(base_url: str, prompt: str, max_tokens: int) -> tuple[str, list[dict[str, float]]]:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="none")
    model = client.models.list().data[0].id
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=5)
    c = r.choices[0]
    return c.text, list(c.logprobs.top_logprobs)


def main(vllm_url: str, foe_url: str, prompts: list[str], max_tokens: int = 24) -> bool:
    same, worst = True, 0.0
    for prompt in prompts:
        (text_v, top_v), (text_f, top_f) = complete(vllm_url, prompt, max_tokens), complete(foe_url, prompt, max_tokens)
        print(f"{prompt!r}\n  vllm: {text_v!r}\n  foe:  {text_f!r}")
        same &= text_v == text_f
        for a, b in zip(top_v, top_f):
            worst = max(worst, *(abs(a[t] - b[t]) for t in a.keys() & b.keys()))
            same &= set(a) == set(b)
    print(f"same greedy text and top-5 tokens: {same}; max |logprob difference| over shared tokens: {worst:.2e}")
    return same


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1], sys.argv[2], sys.argv[3:]) else 1)
