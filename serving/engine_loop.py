"""The engine-loop thread: the one thread that drives an `Engine` (which is not thread-safe).

Front ends (gRPC, HTTP) call `submit` and `abort` from any thread; both only queue a command and wake the loop.
The loop admits requests up to `max_concurrent` into the engine (the rest wait in a server queue of at most
`max_queue`; beyond that `submit` raises `Overloaded`), steps the engine while anything is unfinished, and hands
each request's deltas to the `sink` it brought (called on the loop thread; it must not block). An abort frees the
request's KV pages before the loop's next step. `shutdown` stops admitting, lets in-flight requests finish (or
aborts them after a timeout) and joins the thread.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from typing import Callable

from msjax.engine.engine import Engine, RequestDelta
from msjax.engine.sampling_params import InvalidRequestError, SamplingParams
from serving.metrics import Metrics

log = logging.getLogger("msjax.serving")


class Overloaded(Exception):
    """More requests than max_concurrent_requests + max_queue: try again later (429 / RESOURCE_EXHAUSTED)."""


class Unavailable(Exception):
    """The server is shutting down and admits no new requests (503 / UNAVAILABLE)."""


class EngineFailure(Exception):
    """The engine failed while running this request (500 / INTERNAL); the server goes on serving."""


@dataclasses.dataclass
class Submission:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    sink: Callable[[RequestDelta | Exception], None]
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    num_output: int = 0


class EngineLoop:
    def __init__(self, engine: Engine, metrics: Metrics, *, max_concurrent: int, max_queue: int,
                 expert_load_interval_s: float = 1.0):
        self.engine = engine
        self.metrics = metrics
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.expert_load_interval_s = expert_load_interval_s
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._commands: deque = deque()  # ("add", Submission) | ("abort", request_id)
        self._ids: set[str] = set()  # admitted, unfinished (under the lock)
        self._accepting = True
        self._stopping = False
        # loop-thread state
        self._queued: deque[Submission] = deque()
        self._active: dict[str, Submission] = {}
        self._last_expert_read = time.monotonic()
        self._has_expert_load = not engine.plan.is_colocated  # engine.collect_expert_load reads the nodes
        self._thread = threading.Thread(target=self._run, name="msjax-engine-loop", daemon=True)

    # --- any thread ---

    def start(self) -> None:
        self._thread.start()

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._ids)

    def submit(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
               sink: Callable[[RequestDelta | Exception], None]) -> Submission:
        sub = Submission(request_id, prompt_ids, sampling, sink)
        with self._lock:
            if not self._accepting:
                self.metrics.record_rejected("unavailable")
                raise Unavailable("the server is shutting down")
            if len(self._ids) >= self.max_concurrent + self.max_queue:
                self.metrics.record_rejected("overloaded")
                raise Overloaded(f"the server is at its limit of {self.max_concurrent} running and "
                                 f"{self.max_queue} queued requests; retry later")
            if request_id in self._ids:
                raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
            self._ids.add(request_id)
            self._commands.append(("add", sub))
            self._wake.notify()
        self.metrics.record_admitted(len(prompt_ids))
        return sub

    def abort(self, request_id: str) -> None:
        """Abort a request if it is still unfinished; its sink then gets a final delta with reason "abort"."""
        with self._lock:
            if request_id in self._ids:
                self._commands.append(("abort", request_id))
                self._wake.notify()

    def stop_admitting(self) -> None:
        with self._lock:
            self._accepting = False

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no request is in flight; False on timeout."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._ids, timeout)

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting, let in-flight requests finish within `drain_timeout` (then abort them), stop the
        thread."""
        self.stop_admitting()
        if self._thread.is_alive() and not self.wait_idle(drain_timeout):
            with self._lock:
                ids = list(self._ids)
            for rid in ids:
                self.abort(rid)
            self.wait_idle(10.0)
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join()

    # --- the loop thread ---

    def _busy(self) -> bool:
        return bool(self._commands or self._queued or self._active) or self.engine.has_unfinished()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._busy():
                    self._flush_expert_load()
                    self._wake.wait()
                commands = list(self._commands)
                self._commands.clear()
                stopping = self._stopping
            for kind, arg in commands:
                if kind == "add":
                    self._queued.append(arg)
                else:
                    self._abort(arg)
            if stopping and not self._queued and not self._active and not self.engine.has_unfinished():
                break
            while self._queued and len(self._active) < self.max_concurrent:
                sub = self._queued.popleft()
                try:
                    self.engine.add_request(sub.request_id, sub.prompt_ids, sub.sampling)
                except Exception as err:  # noqa: BLE001 - a bad request fails alone
                    log.warning("request %s refused by the engine: %s", sub.request_id, err)
                    self._finish(sub, err if isinstance(err, ValueError) else EngineFailure(str(err)), "error")
                    continue
                self._active[sub.request_id] = sub
            if commands:
                self.metrics.record_gauges(self.engine.num_running(), self.engine.num_waiting() + len(self._queued),
                                           len(self._queued), self.engine.num_free_pages())
            if not self.engine.has_unfinished():
                if self._active:  # cannot happen unless the engine lost requests: fail them, never spin
                    self._fail_active(EngineFailure("the engine lost the request"))
                continue
            try:
                deltas = self.engine.step()
            except Exception as err:  # noqa: BLE001 - fail the running requests, keep the server up
                log.exception("engine step failed; failing %d running requests", len(self._active))
                self._fail_active(EngineFailure(f"engine step failed: {err}"))
                continue
            now = time.monotonic()
            new_tokens = 0
            deliveries = []  # handed out after the step's metrics are in: a client that has its tokens (and
            # scrapes /metrics next) must find them counted
            for delta in deltas:
                sub = self._active.get(delta.request_id)
                if sub is None:
                    continue
                if delta.token_ids:
                    new_tokens += len(delta.token_ids)
                    if sub.first_token_at is None:
                        sub.first_token_at = now
                        self.metrics.record_first_token(now - sub.arrival)
                    sub.last_token_at = now
                    sub.num_output += len(delta.token_ids)
                if delta.finished:
                    del self._active[delta.request_id]
                    self._finish(sub, None, delta.finish_reason)
                deliveries.append((sub, delta))
            self.metrics.record_step(new_tokens, self.engine.num_running(),
                                     self.engine.num_waiting() + len(self._queued), len(self._queued),
                                     self.engine.num_free_pages())
            for sub, delta in deliveries:
                self._deliver(sub, delta)
            if self._has_expert_load and now - self._last_expert_read > self.expert_load_interval_s:
                self._flush_expert_load()

    def _fail_active(self, error: Exception) -> None:
        """Fail every request in the engine (after a failed step): abort them there, which frees their pages."""
        for rid, sub in list(self._active.items()):
            del self._active[rid]
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001
                log.exception("abort of %s failed", rid)
            self._finish(sub, error, "error")
        try:
            self.engine.step()  # collects the abort deltas (nothing else is left to run)
        except Exception:  # noqa: BLE001
            log.exception("engine step after a failure failed too")

    def _abort(self, request_id: str) -> None:
        for sub in self._queued:
            if sub.request_id == request_id:
                self._queued.remove(sub)
                self._finish(sub, None, "abort")
                self._deliver(sub, RequestDelta(request_id, [], "" if self.engine.tokenizer else None, None,
                                                True, "abort"))
                return
        if request_id in self._active:
            self.engine.abort(request_id)  # frees the pages now; the abort delta comes with the next step

    def _finish(self, sub: Submission, error: Exception | None, reason: str) -> None:
        """Book-keeping of a request that ends (the caller delivers its last delta or error)."""
        now = time.monotonic()
        tpot = None
        if sub.first_token_at is not None and sub.num_output > 1:
            tpot = (sub.last_token_at - sub.first_token_at) / (sub.num_output - 1)
        self.metrics.record_finished(reason, now - sub.arrival, tpot)
        if error is not None:
            self._deliver(sub, error)
        with self._lock:
            self._ids.discard(sub.request_id)
            if not self._ids:
                self._idle.notify_all()
        self.metrics.record_gauges(self.engine.num_running(), self.engine.num_waiting() + len(self._queued),
                                   len(self._queued), self.engine.num_free_pages())

    def _deliver(self, sub: Submission, item) -> None:
        try:
            sub.sink(item)
        except Exception:  # noqa: BLE001 - a consumer gone away must not stop the loop
            log.debug("sink of %s failed", sub.request_id, exc_info=True)

    def _flush_expert_load(self) -> None:
        if self._has_expert_load:
            self._last_expert_read = time.monotonic()
            try:
                self.metrics.record_expert_load(self.engine.collect_expert_load())
            except Exception:  # noqa: BLE001 - metrics must not stop serving
                log.debug("read_expert_load failed", exc_info=True)

    # --- before the loop starts ---

    def warmup(self, progress=None) -> None:
        """Compile every step shape before serving (`Engine.warm_up`: each shape an attention node can run and
        each mix the expert nodes can receive, on padding); `progress(done, total)` after each step."""
        self.engine.warm_up(progress)  # which also drops the expert load the padding counted
