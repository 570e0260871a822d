"""Serving metrics in the Prometheus text exposition format (hand-written; no client library needed).

Histograms: time to first token, inter-token latency, end-to-end request latency. Gauges: running and
waiting requests, KV-cache use. Counters: prompt and generated tokens, finished requests by reason,
preemptions. Observed in the API process from the engine core's step messages; thread-safe (its channel
reader may observe before the first request, the HTTP handler renders).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.total += v
        self.n += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        lines += [f'{self.name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.n}', f"{self.name}_sum {self.total}",
                  f"{self.name}_count {self.n}"]
        return lines


class ServingMetrics:
    PREFIX = "foe_"

    def __init__(self) -> None:
        p = self.PREFIX
        self.lock = threading.Lock()
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from arrival to the first generated token.")
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between consecutive generated tokens.")
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Time from arrival to the last token.")
        self.gauges = {"num_requests_running": 0.0, "num_requests_waiting": 0.0, "kv_cache_usage_ratio": 0.0}
        self.counters = {"prompt_tokens_total": 0, "generation_tokens_total": 0, "num_preemptions_total": 0}
        self.finished: dict[str, int] = {}

    def set_state(self, running: int, waiting: int, kv_usage: float, preemptions: int) -> None:
        with self.lock:
            self.gauges.update(num_requests_running=running, num_requests_waiting=waiting,
                               kv_cache_usage_ratio=kv_usage)
            self.counters["num_preemptions_total"] = preemptions

    def on_tokens(self, n: int, since_arrival: float, since_last: float | None) -> None:
        """n new tokens of one request; since_last is None for its first token."""
        with self.lock:
            self.counters["generation_tokens_total"] += n
            if since_last is None:
                self.ttft.observe(since_arrival)
            else:
                self.itl.observe(since_last)

    def on_finish(self, reason: str, prompt_tokens: int, since_arrival: float) -> None:
        with self.lock:
            self.e2e.observe(since_arrival)
            self.counters["prompt_tokens_total"] += prompt_tokens
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def render(self) -> str:
        p = self.PREFIX
        with self.lock:
            lines: list[str] = []
            for h in (self.ttft, self.itl, self.e2e):
                lines += h.render()
            for k, v in self.gauges.items():
                lines += [f"# TYPE {p}{k} gauge", f"{p}{k} {v}"]
            for k, v in self.counters.items():
                lines += [f"# TYPE {p}{k} counter", f"{p}{k} {v}"]
            lines.append(f"# TYPE {p}request_success_total counter")
            lines += [f'{p}request_success_total{{finished_reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
        return "\n".join(lines) + "\n"
