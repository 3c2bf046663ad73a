"""`SamplingParams`, with vLLM's names and meanings, validated at construction."""

from __future__ import annotations

import dataclasses

from msjax.config import MAX_LOGPROBS
from msjax.errors import ConfigError

__all__ = ["MAX_LOGPROBS", "InvalidRequestError", "SamplingParams"]


class InvalidRequestError(ConfigError):
    """A request's prompt or sampling parameters are invalid; `field` names the culprit."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: all tokens
    seed: int | None = None  # None: drawn by the engine
    stop: tuple[str, ...] | None = None
    stop_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; n: the chosen token's and the top n

    def __post_init__(self):
        def bad(field, message):
            raise InvalidRequestError(field, message)

        # the type first, then the range: "abc" is not "out of range", it is not a number
        for field, kind, optional in (("max_tokens", int, False), ("temperature", float, False),
                                      ("top_p", float, False), ("top_k", int, False), ("seed", int, True),
                                      ("logprobs", int, True)):
            value = getattr(self, field)
            if value is None and optional:
                continue
            expected = (int,) if kind is int else (int, float)
            if isinstance(value, bool) or not isinstance(value, expected):
                bad(field, f"must be {'an integer' if kind is int else 'a number'}, got "
                    f"{type(value).__name__} {value!r}")
        if self.max_tokens <= 0:
            bad("max_tokens", f"must be > 0, got {self.max_tokens!r}")
        if not self.temperature >= 0:  # NaN fails too
            bad("temperature", f"must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            bad("top_k", f"must be >= 0 (0 disables it), got {self.top_k!r}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            bad("seed", f"must be in [0, 2**32), got {self.seed!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            bad("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if stop is not None:
            stop = tuple(stop)
            if not all(isinstance(s, str) and s for s in stop):
                bad("stop", f"must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        if self.stop_token_ids is not None:
            ids = tuple(self.stop_token_ids)
            if not all(isinstance(t, int) and t >= 0 for t in ids):
                bad("stop_token_ids", f"must be non-negative integers, got {self.stop_token_ids!r}")
            object.__setattr__(self, "stop_token_ids", ids)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0
