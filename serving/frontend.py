"""What the gRPC and HTTP front ends share: request validation against the server's caps, and an asyncio
stream of one request's deltas that aborts the request in the engine when its consumer goes away."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading

from msjax.engine.engine import Engine, RequestDelta
from msjax.engine.sampling_params import InvalidRequestError, SamplingParams
from serving.config import ServeConfig
from serving.engine_loop import EngineLoop
from serving.metrics import Metrics

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
                   "logprobs")


class Mailbox:
    """Hands items from the engine-loop thread to queues on one asyncio loop with one wake-up per batch: a step's
    deltas for every streaming request cost one self-pipe write and one callback, not one of each per request
    (what `call_soon_threadsafe` per item costs on the loop thread's core)."""

    def __init__(self, aio: asyncio.AbstractEventLoop):
        self._aio = aio
        self._lock = threading.Lock()
        self._items: list = []  # (queue, item), in the order posted

    def post(self, queue: asyncio.Queue, item) -> None:
        with self._lock:
            self._items.append((queue, item))
            wake = len(self._items) == 1  # else a drain is scheduled already and will take this item too
        if wake:
            self._aio.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


def merge_deltas(first: RequestDelta, later: list[RequestDelta]) -> RequestDelta:
    """One delta that stands for `first` and the `later` ones of the same request, in order: their tokens,
    text and logprobs joined, finished as the last one says."""
    deltas = [first, *later]
    last = deltas[-1]
    text = None if first.text is None else "".join(d.text or "" for d in deltas)
    logprobs = None if any(d.logprobs is None for d in deltas if d.token_ids) else \
        [lp for d in deltas for lp in (d.logprobs or [])]
    return RequestDelta(first.request_id, [t for d in deltas for t in d.token_ids], text, logprobs, last.finished,
                        last.finish_reason)


class RequestStream:
    """The deltas of one submitted request, for `async for`. `close()` (or leaving the loop early, or the
    consuming task being cancelled) aborts the request if it is unfinished. A consumer that falls behind the
    engine gets the deltas waiting for it as one (several tokens in one message), so a slow connection costs
    fewer messages instead of more; a consumer that keeps up gets one delta per step."""

    def __init__(self, frontend: "Frontend", request_id: str, prompt_ids: list[int], sampling: SamplingParams):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.finished = False
        self._loop = frontend.loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._held: Exception | None = None
        box, queue = frontend.mailbox(), self._queue

        def sink(item):
            box.post(queue, item)

        self._loop.submit(request_id, prompt_ids, sampling, sink)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestDelta:
        if self.finished:
            raise StopAsyncIteration
        if self._held is not None:  # an error that arrived behind deltas: after them, on its own
            item, self._held = self._held, None
        else:
            try:
                item = await self._queue.get()
            except BaseException:
                self.close()
                raise
        if isinstance(item, Exception):
            self.finished = True
            raise item
        later, last = [], item
        while not last.finished and not self._queue.empty():
            last = self._queue.get_nowait()
            if isinstance(last, Exception):
                self._held = last
                break
            later.append(last)
        if later:
            item = merge_deltas(item, later)
        if item.finished:
            self.finished = True
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._loop.abort(self.request_id)


class Frontend:
    def __init__(self, engine: Engine, loop: EngineLoop, config: ServeConfig, metrics: Metrics):
        self.engine = engine
        self.loop = loop
        self.config = config
        self.metrics = metrics
        self.max_model_len = engine.max_model_len
        self.max_prompt_tokens = config.max_prompt_tokens or self.max_model_len - 1
        self.max_tokens_cap = config.max_tokens_cap or self.max_model_len
        self._ids = itertools.count()
        self._prefix = os.urandom(3).hex()
        self._mailbox: Mailbox | None = None

    def mailbox(self) -> Mailbox:
        """The one Mailbox of the front ends' asyncio loop (made on first use, from that loop)."""
        if self._mailbox is None:
            self._mailbox = Mailbox(asyncio.get_running_loop())
        return self._mailbox

    def health(self) -> tuple[str, str]:
        """("ok" | "degraded" | "not ready", why): from the runner's cheap check, safe from any thread.
        Degraded: serving on fewer expert nodes than the plan has (some were lost); not ready: the deployment
        cannot step (an attention node or every expert node is gone, or it was closed after a failure)."""
        health = self.engine.runner.health()
        if not health.healthy:
            return "not ready", health.detail
        return ("degraded", health.degraded) if health.degraded else ("ok", "")

    def new_id(self, kind: str) -> str:
        return f"{kind}-{self._prefix}{next(self._ids):06d}"

    def encode(self, prompt, field: str = "prompt") -> list[int]:
        """Token ids of a prompt (text or ids), within the vocabulary and the prompt cap."""
        try:
            ids = self.engine.encode(prompt)
        except InvalidRequestError as err:
            raise InvalidRequestError(field, str(err).partition(": ")[2]) from None
        if len(ids) > self.max_prompt_tokens:
            raise InvalidRequestError(field, f"{len(ids)} tokens exceed this server's max_prompt_tokens="
                                      f"{self.max_prompt_tokens}")
        return ids

    def sampling(self, params: dict, default_max_tokens: int | None = 16) -> SamplingParams:
        """SamplingParams from the request's fields (None: the default), capped by max_tokens_cap."""
        params = {k: v for k, v in params.items() if v is not None}
        if "max_tokens" not in params and default_max_tokens is not None:
            params["max_tokens"] = min(default_max_tokens, self.max_tokens_cap)
        if "max_tokens" in params and isinstance(params["max_tokens"], int) and not isinstance(
                params["max_tokens"], bool) and params["max_tokens"] > self.max_tokens_cap:
            raise InvalidRequestError("max_tokens", f"{params['max_tokens']} exceeds this server's max_tokens_cap="
                                      f"{self.max_tokens_cap}")
        if "ignore_eos" in params and not isinstance(params["ignore_eos"], bool):
            raise InvalidRequestError("ignore_eos", f"must be a boolean, got {params['ignore_eos']!r}")
        if "stop" in params and not isinstance(params["stop"], (str, list, tuple)):
            raise InvalidRequestError("stop", f"must be a string or a list of strings, got {params['stop']!r}")
        if "stop_token_ids" in params:
            ids = params["stop_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.engine.model_config.vocab_size
                    for t in ids):
                raise InvalidRequestError("stop_token_ids", f"must be token ids in [0, "
                                          f"{self.engine.model_config.vocab_size}), got {ids!r}")
        return SamplingParams(**params)  # checks each field's type, then its range

    def open(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams) -> RequestStream:
        """Submit (raises Overloaded / Unavailable / InvalidRequestError) and return the stream of deltas."""
        return RequestStream(self, request_id, prompt_ids, sampling)
