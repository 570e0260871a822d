"""Run vLLM's offline engine on a foe checkpoint and print greedy tokens and top-5 logprobs as JSON.

    python tests/vllm/run_vllm.py CHECKPOINT MAX_TOKENS TENSOR_PARALLEL PROMPT [PROMPT ...]

A script, not a test: the parity tests start it in a fresh process per checkpoint, because vLLM's
engine owns its processes and its KV cache for the life of the `LLM` object. vLLM spawns workers,
hence the __main__ guard.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> None:
    from vllm import LLM, SamplingParams

    checkpoint, max_tokens, tp, prompts = argv[0], int(argv[1]), int(argv[2]), argv[3:]
    # float32 for parity; eager (no CPU Triton); generation_config="vllm": sampling defaults from vLLM,
    # not from config.json, whose fields are model hyper-parameters.
    llm = LLM(model=checkpoint, dtype="float32", enforce_eager=True, seed=0, generation_config="vllm",
              tensor_parallel_size=tp)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=5, ignore_eos=True)
    results = []
    for out in llm.generate(prompts, params, use_tqdm=False):
        o = out.outputs[0]
        results.append({"prompt_token_ids": list(out.prompt_token_ids), "token_ids": list(o.token_ids),
                        "text": o.text,
                        "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in o.logprobs]})
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
