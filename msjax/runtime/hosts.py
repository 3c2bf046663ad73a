"""How a runner reaches its nodes: every node behind the same two calls, `submit(key, request)` then
`reply(key)`, one reply per request, in order.

`LocalHost` holds nodes in the runner's process: requests are method calls, and a step's programs are dispatched
by driving every submitted step generator in phase order (see `msjax.runtime.nodes`), so one thread feeds all
of them without ever waiting on a program it has not dispatched. `ProcessLinks` reaches node processes over
their control channels (typed messages, `msjax.comm.wire`), waiting while the process lives.
"""

from __future__ import annotations

import time

from msjax.comm import native, wire
from msjax.runtime import protocol as p


class WorkerError(RuntimeError):
    """A node process failed to start, died, or broke the exchange; the deployment is closed."""


class NodeLost(WorkerError):
    """Node `key` ((role, index)) is gone: its process exited, or its channel failed. For an expert node the
    runner re-routes around it (`NodeRunner`); anything else closes the deployment."""

    def __init__(self, key, message: str):
        super().__init__(message)
        self.key = key


class LocalHost:
    """Nodes in this process, by key ((role, index))."""

    def __init__(self):
        self.nodes: dict = {}
        self._running: dict = {}  # key -> [phase of the next program, step generator]
        self._replies: dict = {}

    def add(self, key, node) -> None:
        self.nodes[key] = node

    def __contains__(self, key) -> bool:
        return key in self.nodes

    def submit(self, key, request) -> None:
        node = self.nodes[key]
        if isinstance(request, p.STEP_REQUESTS):
            steps = node.step(request)
            self._running[key] = [next(steps), steps]  # checks the request; dispatches nothing yet
        else:
            self._replies[key] = node.control(request)

    def reply(self, key):
        while self._running:  # every submitted step's programs, in phase order
            self._advance()
        return self.nodes[key].result(self._replies.pop(key))

    def _advance(self) -> None:
        key = min(self._running, key=lambda k: self._running[k][0])  # ties: the order of submission
        entry = self._running[key]
        try:
            entry[0] = entry[1].send(None)
        except StopIteration as done:
            del self._running[key]
            self._replies[key] = done.value

    def abandon(self) -> None:
        """Forget the steps in flight (after a failure: the deployment is being closed)."""
        self._running.clear()
        self._replies.clear()

    def close(self) -> None:
        self.abandon()
        for node in self.nodes.values():
            node.close()
        self.nodes.clear()


class ProcessLinks:
    """Node processes, by key, over their control channels: `senders[key]` to its control receiver,
    `receivers[key]` its reply channel. `check(key, when)`, called while waiting for node `key`, raises a
    WorkerError (a NodeLost for that node itself) when a process the wait depends on exited."""

    def __init__(self, senders: dict, receivers: dict, check, wait_s: float):
        self.senders, self.receivers, self.check, self.wait_s = senders, receivers, check, wait_s

    def __contains__(self, key) -> bool:
        return key in self.senders

    def submit(self, key, request, timeout_s: float = -1) -> None:
        data = wire.encode(request)
        tx = self.senders[key]
        if len(data) > tx.capacity:
            raise ValueError(f"a {type(request).__name__} of {len(data)} bytes for {key[0]} node {key[1]} exceeds "
                             f"its control channel's {tx.capacity}")
        tx.send(0, data, timeout_s=timeout_s)

    def reply(self, key, wait_s: float | None = None):
        """The node's reply to its oldest unanswered request. Waits while every node process lives (a step's first
        programs compile) for at most `wait_s` (default: start-up plus exchange timeouts)."""
        deadline = time.monotonic() + (self.wait_s if wait_s is None else wait_s)
        while True:
            try:
                with native.thread_poll_us(0):  # a step-long wait: sleep, leave the core to the node processes
                    raw = self.receivers[key].recv(0, timeout_s=1.0)
                return wire.decode(raw)
            except native.M2NTimeout:
                self.check(key, "during the step")
                if time.monotonic() > deadline:
                    raise WorkerError(f"{key[0]} node {key[1]} did not answer within "
                                      f"{self.wait_s if wait_s is None else wait_s:.0f} s") from None
