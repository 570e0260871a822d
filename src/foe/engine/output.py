"""The API process's side of a step: token ids from the engine core become text, and stop strings end requests.

As in vLLM v1's output processor, the core sends token ids and logprobs only; text is decoded here, out
of the engine's process. Each sample keeps its output ids and a `TextState`; a delta's text is what the
`Detokenizer` releases. The rules are the ones the engine applied when it decoded in-process: a stop token
ends the text before it, a stop string cuts the text where it starts (the core is then told to abort the
sequence, which may have run a step further: those tokens are dropped), and an abort or an echo-only
finish decodes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from foe.engine.detokenizer import Detokenizer, TextState
from foe.engine.ipc import CoreDelta
from foe.engine.request import TokenLogprob


@dataclass
class RequestDelta:
    """What one step added to one sample of a request, as the HTTP layer streams it."""

    seq_id: int
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    new_text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    # prompt_logprobs[i] scores prompt token i (entry 0 is None); set when the request asked for them (echo)
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class SampleText:
    """One sample's text so far."""

    state: TextState
    output_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def apply(self, d: CoreDelta, detok: Detokenizer) -> RequestDelta:
        """The text released by the core's delta `d`; finished by a stop string when one appears."""
        if d.prompt_logprobs is not None:
            self.prompt_logprobs = d.prompt_logprobs
        reason, text = d.finish_reason, ""
        if d.token_ids:
            self.output_ids += d.token_ids
            ids = self.output_ids[:-1] if reason == "stop" else self.output_ids  # a stop token prints nothing
            text = detok.update(self.state, ids, final=reason is not None)
            if self.state.hit_stop:
                reason = "stop"
        return RequestDelta(d.seq_id, d.token_ids, d.logprobs, text, reason is not None, reason, self.prompt_logprobs)
