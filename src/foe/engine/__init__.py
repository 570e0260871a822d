"""The inference engine and its OpenAI-compatible server, split by noun.

  request.py      Sequence state, RequestParams, the plain-data StepPlan rank 0 broadcasts
  kv_cache.py     BlockManager (free list, ref counts, prefix caching), KVPool
  paged_attention.py  PackedStep (a step as one flat token stream) and PagedKVCache (attention on the pool)
  kernels.py      the native decode-attention kernel (csrc/), built on first use; torch fallback
  scheduler.py    continuous batching, chunked prefill, preemption by recompute (pure CPU)
  runner.py       ModelRunner: packed step -> forward -> logits (one per rank)
  sampler.py      greedy / temperature / top-k / top-p with per-request generators; logprobs
  detokenizer.py  incremental text with stop strings
  output.py       the API process's side of a step: token ids -> text, stop strings (as vLLM v1)
  engine.py       LLMEngine.step(): schedule -> run -> sample -> postprocess
  worker.py       multi-rank execution (rank 0 schedules and samples; all ranks run the model)
  ipc.py          the messages between the API process and the engine core (one per step)
  core.py         EngineCore: the step loop, fed over a connection, sending token ids and logprobs
  core_process.py where the core runs: its own process (foe serve) or a thread (tests); build_engine
  async_engine.py the API process's asyncio handle on the core: submit, abort, per-request streams
  protocol.py     OpenAI request models, error bodies, the completions logprobs block
  server.py       FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics
  metrics.py      Prometheus text exposition (TTFT, ITL, E2E histograms; queue and KV gauges)
  launch.py       wiring it together: `serve_forever` (foe serve: API process + core process) and
                  `ServerHandle` (tests)

Imports run one way: the engine imports `foe.model` and `foe.parallel`, never the reverse.
"""
