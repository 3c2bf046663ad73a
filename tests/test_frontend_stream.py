"""RequestStream without an engine: the engine-loop thread's deltas reach the asyncio side through one wake-up
per batch (Mailbox), and a consumer that lags gets the waiting deltas merged into one, errors on their own."""

import asyncio
import threading

import pytest

from msjax.engine.engine import RequestDelta
from serving.frontend import Mailbox, RequestStream, merge_deltas


class FakeLoop:
    """The part of EngineLoop a RequestStream uses: submit (keeps the sink) and abort."""

    def __init__(self):
        self.sink, self.aborted = None, []

    def submit(self, request_id, prompt_ids, sampling, sink):
        self.sink = sink

    def abort(self, request_id):
        self.aborted.append(request_id)


class FakeFrontend:
    def __init__(self):
        self.loop = FakeLoop()
        self._box = None

    def mailbox(self):
        self._box = self._box or Mailbox(asyncio.get_running_loop())
        return self._box


def delta(tokens, text="", finished=False, reason=None, logprobs=None):
    return RequestDelta("r", tokens, text, logprobs, finished, reason)


def test_merge_joins_tokens_text_and_logprobs_in_order():
    merged = merge_deltas(delta([1], "a", logprobs=[{1: -0.1}]),
                          [delta([2], "b", logprobs=[{2: -0.2}]), delta([3], "c", True, "length", [{3: -0.3}])])
    assert merged == RequestDelta("r", [1, 2, 3], "abc", [{1: -0.1}, {2: -0.2}, {3: -0.3}], True, "length")
    no_text = merge_deltas(RequestDelta("r", [1], None, None, False, None), [RequestDelta("r", [2], None, None,
                                                                                         False, None)])
    assert no_text.text is None and no_text.logprobs is None and no_text.token_ids == [1, 2]


def test_lagging_consumer_gets_one_merged_delta_and_the_error_after_it():
    async def main():
        fe = FakeFrontend()
        stream = RequestStream(fe, "r", [5], None)
        sink = fe.loop.sink
        # the engine-loop thread posts three steps' deltas before the consumer looks
        poster = threading.Thread(target=lambda: [sink(delta([t], str(t))) for t in (1, 2, 3)])
        poster.start()
        poster.join()
        await asyncio.sleep(0)  # the one drain callback runs
        first = await stream.__anext__()
        assert first.token_ids == [1, 2, 3] and first.text == "123" and not first.finished
        sink(delta([4], "4"))
        sink(RuntimeError("engine step failed"))
        await asyncio.sleep(0)
        second = await stream.__anext__()
        assert second.token_ids == [4]  # the error behind it is not merged in ...
        with pytest.raises(RuntimeError, match="engine step failed"):  # ... it comes on its own, next
            await stream.__anext__()
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        assert fe.loop.aborted == []  # it ended with the error; nothing left to abort

    asyncio.run(main())


def test_consumer_that_keeps_up_gets_one_delta_per_step_and_stops_at_finish():
    async def main():
        fe = FakeFrontend()
        stream = RequestStream(fe, "r", [5], None)
        got = []
        for t in (1, 2):
            fe.loop.sink(delta([t], finished=t == 2, reason="length" if t == 2 else None))
            await asyncio.sleep(0)
            got.append(await stream.__anext__())
        assert [d.token_ids for d in got] == [[1], [2]] and got[-1].finished
        fe.loop.sink(delta([9]))  # nothing after the finish is read
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()

    asyncio.run(main())


def test_mailbox_wakes_the_loop_once_per_batch():
    async def main():
        aio = asyncio.get_running_loop()
        box, queues = Mailbox(aio), [asyncio.Queue() for _ in range(16)]
        wakes = []
        original = aio.call_soon_threadsafe
        aio.call_soon_threadsafe = lambda *a: (wakes.append(1), original(*a))
        try:
            thread = threading.Thread(target=lambda: [box.post(q, i) for i, q in enumerate(queues)])
            thread.start()
            thread.join()
            await asyncio.sleep(0)
        finally:
            aio.call_soon_threadsafe = original
        assert len(wakes) == 1 and [q.get_nowait() for q in queues] == list(range(16))

    asyncio.run(main())
