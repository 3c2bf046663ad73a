"""Server metrics in the Prometheus text format (version 0.0.4), without a client library.

The engine-loop thread writes (after each step); the HTTP thread renders `/metrics`. Each metric has its own
lock-free-enough update under one registry lock, so a scrape sees a consistent snapshot.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from typing import Callable

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip(self.buckets, self.counts):
            total += n
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self, model_name: str, num_experts: int, total_pages: int):
        self._lock = threading.Lock()
        self.model_name = model_name
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.requests = {}  # finish reason (stop, length, abort, error) -> count
        self.rejected = {}  # reason (overloaded, invalid, unavailable) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.expert_tokens = [0] * num_experts
        self.running = 0
        self.waiting = 0
        self.queue_depth = 0
        self.total_pages = total_pages
        self.free_pages = total_pages
        self.steps = 0
        self._recent = deque()  # (time, tokens) of the last window, for tokens/s
        self.window_s = 10.0
        # the runner's lost-expert-node counts (`msjax.runtime.faults.FaultStats`), read at render; None for a
        # deployment without expert nodes
        self.fault_stats: Callable[[], object] | None = None

    # --- writers (the engine-loop thread, and front ends for rejections) ---

    def record_step(self, new_tokens: int, running: int, waiting: int, queued: int, free_pages: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.steps += 1
            self.generation_tokens += new_tokens
            self.running, self.waiting, self.queue_depth, self.free_pages = running, waiting, queued, free_pages
            if new_tokens:
                self._recent.append((now, new_tokens))
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()

    def record_gauges(self, running: int, waiting: int, queued: int, free_pages: int) -> None:
        with self._lock:
            self.running, self.waiting, self.queue_depth, self.free_pages = running, waiting, queued, free_pages

    def record_admitted(self, prompt_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens

    def record_first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def record_finished(self, reason: str, e2e_s: float, tpot_s: float | None) -> None:
        with self._lock:
            self.requests[reason] = self.requests.get(reason, 0) + 1
            self.e2e.observe(e2e_s)
            if tpot_s is not None:
                self.tpot.observe(tpot_s)

    def record_rejected(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def record_expert_load(self, load) -> None:
        with self._lock:
            for i, n in enumerate(load):
                self.expert_tokens[i] += int(n)

    # --- the reader ---

    def tokens_per_second(self) -> float:
        with self._lock:
            now = time.monotonic()
            recent = [(t, n) for t, n in self._recent if t >= now - self.window_s]
            return sum(n for _, n in recent) / self.window_s

    def render(self) -> str:
        tps = self.tokens_per_second()
        with self._lock:
            lines = []

            def metric(name, kind, help_text, samples):
                lines.append(f"# HELP {name} {help_text}")
                lines.append(f"# TYPE {name} {kind}")
                lines.extend(samples)

            def scalar(name, kind, help_text, value):
                metric(name, kind, help_text, [f"{name} {value}"])

            metric("msjax_time_to_first_token_seconds", "histogram", "Time from arrival to the first token.",
                   self.ttft.lines("msjax_time_to_first_token_seconds"))
            metric("msjax_time_per_output_token_seconds", "histogram",
                   "Mean time between output tokens of a request (after the first).",
                   self.tpot.lines("msjax_time_per_output_token_seconds"))
            metric("msjax_e2e_request_latency_seconds", "histogram", "Time from arrival to the last token.",
                   self.e2e.lines("msjax_e2e_request_latency_seconds"))
            metric("msjax_requests_finished_total", "counter", "Requests finished, by finish reason.",
                   [f'msjax_requests_finished_total{{finish_reason="{k}"}} {v}'
                    for k, v in sorted(self.requests.items())] or ['msjax_requests_finished_total{finish_reason="stop"} 0'])
            metric("msjax_requests_rejected_total", "counter", "Requests refused before they ran, by reason.",
                   [f'msjax_requests_rejected_total{{reason="{k}"}} {v}' for k, v in sorted(self.rejected.items())]
                   or ['msjax_requests_rejected_total{reason="overloaded"} 0'])
            scalar("msjax_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", self.prompt_tokens)
            scalar("msjax_generation_tokens_total", "counter", "Generated tokens.", self.generation_tokens)
            scalar("msjax_generation_tokens_per_second", "gauge",
                   f"Generated tokens per second over the last {self.window_s:g} s.", f"{tps:.3f}")
            scalar("msjax_engine_steps_total", "counter", "Engine steps run.", self.steps)
            scalar("msjax_num_requests_running", "gauge", "Requests the engine is running.", self.running)
            scalar("msjax_num_requests_waiting", "gauge", "Requests admitted but not yet running.", self.waiting)
            scalar("msjax_queue_depth", "gauge", "Requests waiting for an engine slot (server queue).",
                   self.queue_depth)
            scalar("msjax_kv_pages_total", "gauge", "KV cache pages (all attention replicas).", self.total_pages)
            used = self.total_pages - self.free_pages
            scalar("msjax_kv_pages_used", "gauge", "KV cache pages in use.", used)
            scalar("msjax_kv_cache_usage_ratio", "gauge", "Fraction of KV cache pages in use.",
                   f"{used / max(self.total_pages, 1):.6f}")
            metric("msjax_expert_tokens_total", "counter", "Tokens routed to each expert, summed over layers.",
                   [f'msjax_expert_tokens_total{{expert="{i}"}} {n}' for i, n in enumerate(self.expert_tokens)])
            faults = self.fault_stats() if self.fault_stats is not None else None
            if faults is not None:
                for name, kind, help_text, value in (
                        ("msjax_expert_node_faults_total", "counter", "Expert nodes lost.", faults.faults),
                        ("msjax_steps_rerun_total", "counter", "Steps run again after an expert node was lost "
                         "during them.", faults.rerun_steps),
                        ("msjax_expert_rebuilds_total", "counter", "Losses that loaded experts again (no live "
                         "replica held them).", faults.rebuilds),
                        ("msjax_expert_rebuild_seconds_total", "counter", "Time spent loading them.",
                         f"{faults.rebuild_s:.6f}"),
                        ("msjax_degraded_steps_total", "counter", "Steps run on fewer expert nodes than the plan "
                         "has.", faults.degraded_steps),
                        ("msjax_degraded_tokens_total", "counter", "Tokens sampled in those steps.",
                         faults.degraded_tokens)):
                    scalar(name, kind, help_text, value)
            return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, float]:
    """Samples of a Prometheus text page as {"name{labels}": value} (for tests and the load benchmark)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
