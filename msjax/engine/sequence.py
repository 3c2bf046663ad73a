"""One request as the engine tracks it: its tokens, its pages and how far the KV cache has caught up."""

from __future__ import annotations

import dataclasses
import enum

from msjax.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # no pages; (re)starts with a prefill of all its tokens
    RUNNING = "running"  # has pages; prefilling in chunks or decoding
    FINISHED = "finished"


@dataclasses.dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    seed: int
    replica: int = 0  # the attention replica (data-parallel node) whose KV pages hold this sequence
    output_ids: list[int] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_decoding(self) -> bool:
        """All but the last (freshly sampled) token are cached: one decode step feeds that token."""
        return self.status is Status.RUNNING and self.num_tokens - self.num_computed == 1

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    def pages_needed(self, total_tokens: int, page_size: int) -> int:
        """Extra pages this sequence needs to hold `total_tokens` tokens."""
        return max(0, -(-total_tokens // page_size) - len(self.pages))
