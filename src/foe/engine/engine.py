"""LLMEngine: the step loop. `step()` = schedule -> run the model (all ranks) -> sample -> postprocess.

Postprocessing appends sampled tokens, records logprobs (generated and, for echo, prompt tokens),
applies stop token ids (EOS unless ignore_eos), stop strings and max_tokens, frees finished sequences'
blocks and returns per-request deltas for streaming. Not thread-safe: one thread drives it (see
`async_engine.py`). Where the model runs is the executor's business: `LocalExecutor` here, or the
multi-process one in `worker.py`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tokenizers import Tokenizer

from foe.config import ModelConfig
from foe.engine.detokenizer import Detokenizer, TextState
from foe.engine.request import RequestParams, Sequence, StepPlan, TokenLogprob
from foe.engine.runner import ModelRunner
from foe.engine.sampler import sample, token_logprobs
from foe.engine.scheduler import Scheduler, SchedulerConfig
from foe.model.transformer import Transformer
from foe.tokenizer import eos_id


class Executor(Protocol):
    """Runs a step plan on every rank; returns the logits of each data-parallel shard."""

    def execute(self, plan: StepPlan) -> list[torch.Tensor]: ...

    def idle(self) -> None:
        """Called when there is nothing to run (keep-alive for remote ranks)."""

    def close(self) -> None: ...


class LocalExecutor:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int) -> None:
        self.runner = ModelRunner(model, num_blocks, block_size)

    def execute(self, plan: StepPlan) -> list[torch.Tensor]:
        return [self.runner.execute_plan(plan)]

    def idle(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class RequestOutput:
    """What one step added to one request (a streaming delta)."""

    seq: Sequence
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    new_text: str = ""
    finished: bool = False

    @property
    def seq_id(self) -> int:
        return self.seq.seq_id


class LLMEngine:
    def __init__(self, executor: Executor, cfg: SchedulerConfig, model_cfg: ModelConfig,
                 tokenizer: Tokenizer | None = None) -> None:
        self.executor, self.cfg, self.model_cfg = executor, cfg, model_cfg
        self.max_seq_len, self.vocab_size = model_cfg.max_seq_len, model_cfg.vocab_size
        self.scheduler = Scheduler(cfg)
        self.tokenizer = tokenizer
        self.detok = Detokenizer(tokenizer) if tokenizer is not None else None
        self.eos_token_id = eos_id(tokenizer) if tokenizer is not None else None
        self.seqs: dict[int, Sequence] = {}
        self.text: dict[int, TextState] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self.num_generated = 0

    @classmethod
    def from_model(cls, model: Transformer, cfg: SchedulerConfig, tokenizer: Tokenizer | None = None) -> LLMEngine:
        if cfg.dp_size != 1:
            raise ValueError("a single-process engine has one data-parallel shard")
        return cls(LocalExecutor(model, cfg.num_blocks, cfg.block_size), cfg, model.cfg, tokenizer)

    # ---- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: RequestParams, share_from: Sequence | None = None
                    ) -> Sequence:
        """Queue a request (ValueError for one that can never run: too long, bad token ids). share_from:
        an earlier sample of the same prompt whose KV blocks it shares (see `add_samples`)."""
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n > self.max_seq_len:
            raise ValueError(f"the prompt has {n} tokens; the model's context is {self.max_seq_len} tokens")
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if n + params.max_tokens > self.max_seq_len:
            raise ValueError(f"the model's context is {self.max_seq_len} tokens, but the request asks for "
                             f"{n + params.max_tokens} ({n} in the prompt, {params.max_tokens} to generate)")
        seq = Sequence(next(self._ids), list(prompt_ids), params, eos_token_id=self.eos_token_id)
        self.scheduler.add(seq, share_from)
        self.seqs[seq.seq_id] = seq
        self.text[seq.seq_id] = TextState(params.stop)
        if params.max_tokens == 0 and params.prompt_logprobs is None:  # nothing to compute
            self._finish(seq, "length")
        return seq

    def add_samples(self, prompt_ids: list[int], params: RequestParams, n: int) -> list[Sequence]:
        """n independent samples of one prompt (OpenAI's `n`): sample i is seeded with seed + i when
        seeded; samples 2..n share the first one's prompt blocks once it has computed them."""
        first = self.add_request(prompt_ids, params)
        return [first, *(self.add_request(prompt_ids, params.for_sample(i), first) for i in range(1, n))]

    def abort(self, seq_id: int) -> None:
        """Drop a request (client went away); its KV blocks are freed now."""
        seq = self.seqs.get(seq_id)
        if seq is not None and not seq.is_finished:
            self._finish(seq, "abort")

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.seqs.pop(seq.seq_id, None)
        self.text.pop(seq.seq_id, None)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # ---- the step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        plan, rows = self.scheduler.schedule()
        if not rows:
            return []
        logits = self.executor.execute(plan)
        self.scheduler.update(rows)
        self.num_steps += 1
        outs: dict[int, RequestOutput] = {}
        to_sample: list[tuple[Sequence, torch.Tensor]] = []
        for shard, shard_logits in zip(plan.shards, logits):
            off = 0
            for rp in shard:
                seq = self.seqs[rp.seq_id]
                chunk = shard_logits[off:off + rp.num_logits]
                off += rp.num_logits
                first = rp.start + rp.logits_from
                if seq.wants_prompt_logprobs:
                    self._score_prompt(seq, first, chunk)
                if rp.num_logits and first + rp.num_logits == seq.num_tokens:
                    to_sample.append((seq, chunk[-1]))
        if to_sample:
            self._sample(to_sample, outs)
        return list(outs.values())

    def _score_prompt(self, seq: Sequence, first_pos: int, logits_NV: torch.Tensor) -> None:
        """Logits at position p score prompt token p + 1; record the ones not yet scored."""
        pos = torch.arange(first_pos, first_pos + logits_NV.shape[0])
        keep = (pos + 1 < len(seq.prompt_ids)) & (pos + 1 >= len(seq.prompt_logprobs))
        if not keep.any():
            return
        pos = pos[keep]
        targets = torch.tensor(seq.prompt_ids)[pos + 1]
        seq.prompt_logprobs.extend(self._logprobs(logits_NV[keep.to(logits_NV.device)], targets,
                                                  seq.params.prompt_logprobs or 0))

    @staticmethod
    def _logprobs(logits_NV: torch.Tensor, ids_N: torch.Tensor, top_n: int) -> list[TokenLogprob]:
        chosen, top_v, top_i = token_logprobs(logits_NV, ids_N, top_n)
        # whole tensors to lists: one device-to-host copy each, not one per row
        return [TokenLogprob(int(t), float(c), list(zip(ti, tv)))
                for t, c, tv, ti in zip(ids_N.tolist(), chosen.tolist(), top_v.tolist(), top_i.tolist())]

    def _sample(self, items: list[tuple[Sequence, torch.Tensor]], outs: dict[int, RequestOutput]) -> None:
        seqs = [s for s, _ in items]
        logits_NV = torch.stack([x for _, x in items])
        if any(s.params.max_tokens == 0 for s in seqs):  # echo-only rows end here, unsampled
            for s in seqs:
                if s.params.max_tokens == 0:
                    outs[s.seq_id] = RequestOutput(s, finished=True)
                    self._finish(s, "length")
            keep = [i for i, s in enumerate(seqs) if s.params.max_tokens > 0]
            seqs, logits_NV = [seqs[i] for i in keep], logits_NV[keep]
            if not seqs:
                return
        tokens = sample(logits_NV, [s.params.sampling for s in seqs], [s.generator for s in seqs])
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        lps = dict(zip(want, self._logprobs(logits_NV[want], tokens[want],
                                            max((seqs[i].params.logprobs or 0) for i in want)))) if want else {}
        for i, (seq, tok) in enumerate(zip(seqs, tokens.tolist())):
            out = outs.setdefault(seq.seq_id, RequestOutput(seq))
            seq.output_ids.append(tok)
            out.new_token_ids.append(tok)
            self.num_generated += 1
            if i in lps:
                lp = lps[i]
                lp.top = lp.top[:seq.params.logprobs or 0]
                seq.output_logprobs.append(lp)
                out.new_logprobs.append(lp)
            reason = self._stop_reason(seq, tok)
            if self.detok is not None:
                state = self.text[seq.seq_id]
                ids = seq.output_ids[:-1] if reason == "stop" else seq.output_ids
                out.new_text = self.detok.update(state, ids, final=reason is not None)
                if state.hit_stop:
                    reason = "stop"
            if reason is not None:
                out.finished = True
                self._finish(seq, reason)

    def _stop_reason(self, seq: Sequence, tok: int) -> str | None:
        p = seq.params
        if tok in p.stop_token_ids or (not p.ignore_eos and tok == seq.eos_token_id):
            return "stop"
        if len(seq.output_ids) >= p.max_tokens:
            return "length"
        return None

    def generate(self, prompts: list[list[int]], params: RequestParams) -> list[list[int]]:
        """Offline convenience: run the given prompts to completion; returns generated ids per prompt."""
        seqs = [self.add_request(p, params) for p in prompts]
        while self.has_unfinished:
            self.step()
        return [s.output_ids for s in seqs]

    def close(self) -> None:
        self.executor.close()
