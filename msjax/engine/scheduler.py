"""Continuous batching: which sequences run in the next step, and with how many tokens.

Policy (small on purpose, after vLLM's and nano-vllm's):
- A step is either a prefill step (prompt chunks, at most `max_num_batched_tokens` tokens) or a decode step
  (one token for each decoding sequence, at most `max_num_seqs`). Prefill goes first, so new requests start soon.
- A prompt longer than the budget is prefilled in chunks over several steps.
- A waiting request is admitted only if the pages of its whole prompt fit while leaving one free page per
  decoding sequence, and it gets them all at admission: a prompt prefilled in chunks never runs out of pages
  part-way (two long prompts that fit only one at a time would otherwise preempt each other forever, and the
  decode steps they hold up would never run).
- Admission order is priority: when a running sequence needs a page and none is free, the latest-admitted
  sequence admitted after it is preempted, or the sequence itself when it is the latest. Its pages are freed and
  it goes back to the front of the queue, to be recomputed from its prompt and the tokens it has produced (its
  sampling keys depend only on its own seed and token index, so it continues exactly as before). The
  earliest-admitted sequence therefore always makes progress.
"""

from __future__ import annotations

import collections
import dataclasses

from msjax.config import EngineConfig
from msjax.engine.sequence import Sequence, Status
from msjax.kv_cache import PageAllocator


@dataclasses.dataclass(frozen=True)
class Chunk:
    seq: Sequence
    start: int  # position of the first token
    num_tokens: int

    @property
    def samples(self) -> bool:
        """After this chunk every token of the sequence is cached, so the step samples its next token."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclasses.dataclass(frozen=True)
class StepPlan:
    decode: bool
    chunks: list[Chunk]


@dataclasses.dataclass
class SchedulerStats:
    num_preemptions: int = 0
    num_partial_prefill_chunks: int = 0  # prefill chunks that left part of a prompt for a later step
    num_prefill_steps: int = 0
    num_decode_steps: int = 0


class Scheduler:
    def __init__(self, cfg: EngineConfig, allocator: PageAllocator):
        self.cfg = cfg
        self.allocator = allocator
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order
        self.stats = SchedulerStats()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished (or aborted) and return its pages at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.allocator.free(seq.pages)
        seq.pages = []
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def schedule(self) -> StepPlan | None:
        plan = self._schedule_prefill()
        if plan is None:
            plan = self._schedule_decode()
        if plan is not None:
            if plan.decode:
                self.stats.num_decode_steps += 1
            else:
                self.stats.num_prefill_steps += 1
        return plan

    def _schedule_prefill(self) -> StepPlan | None:
        budget = self.cfg.max_num_batched_tokens
        chunks: list[Chunk] = []
        scheduled: set[int] = set()
        # Sequences that are part-way through their prompt continue first.
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING or seq.is_decoding:
                continue
            n = min(seq.num_uncomputed, budget)
            if not self._make_room(seq, seq.pages_needed(seq.num_computed + n, self.cfg.page_size), scheduled):
                continue
            chunks.append(self._chunk(seq, n))
            scheduled.add(id(seq))
            budget -= n
        reserve = sum(s.is_decoding for s in self.running)
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens, budget)
            need = seq.pages_needed(seq.num_tokens, self.cfg.page_size)  # the whole prompt, not just this chunk
            if self.allocator.num_free - need < reserve:
                break
            self.waiting.popleft()
            seq.pages += self.allocator.allocate(need)
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(self._chunk(seq, n))
            scheduled.add(id(seq))
            budget -= n
        return StepPlan(decode=False, chunks=chunks) if chunks else None

    def _chunk(self, seq: Sequence, n: int) -> Chunk:
        chunk = Chunk(seq, seq.num_computed, n)
        if not chunk.samples:
            self.stats.num_partial_prefill_chunks += 1
        return chunk

    def _schedule_decode(self) -> StepPlan | None:
        chunks: list[Chunk] = []
        scheduled: set[int] = set()
        for seq in list(self.running):
            if len(chunks) == self.cfg.max_num_seqs:
                break
            if seq.status is not Status.RUNNING or not seq.is_decoding:
                continue  # preempted by an earlier sequence of this step, or still prefilling
            if not self._make_room(seq, seq.pages_needed(seq.num_tokens, self.cfg.page_size), scheduled):
                continue
            chunks.append(Chunk(seq, seq.num_tokens - 1, 1))
            scheduled.add(id(seq))
        return StepPlan(decode=True, chunks=chunks) if chunks else None

    def _make_room(self, seq: Sequence, need: int, scheduled: set[int]) -> bool:
        """Allocate `need` pages for seq, preempting the latest-admitted unscheduled sequences admitted after it.
        Returns False (and preempts seq itself) when none is left: an earlier sequence is never preempted by a
        later one, so the two cannot take turns preempting each other."""
        while not self.allocator.can_allocate(need):
            later = self.running[self.running.index(seq) + 1:]
            victims = [s for s in later if id(s) not in scheduled]
            victim = victims[-1] if victims else seq
            self._preempt(victim)
            if victim is seq:
                return False
        seq.pages += self.allocator.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.pages)
        seq.pages, seq.num_computed, seq.status = [], 0, Status.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.stats.num_preemptions += 1
