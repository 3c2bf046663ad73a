"""`Engine`: the incremental interface the serving layer drives, and what `msjax.LLM` wraps.

    engine.add_request("a", "Beautiful is", SamplingParams(max_tokens=8))
    while engine.has_unfinished():
        for delta in engine.step(): ...

Threading: an Engine is driven from one thread. `add_request`, `abort` and `step` are not safe to call
concurrently; a server runs them all on its engine-loop thread and hands results to other threads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from msjax.config import DeploymentPlan, EngineConfig
from msjax.engine.batch import build_micro_batches
from msjax.engine.sampling_params import InvalidRequestError, SamplingParams
from msjax.engine.scheduler import Chunk, Scheduler, SchedulerStats
from msjax.engine.sequence import Sequence, Status
from msjax.kv_cache import PageAllocator

REPLACEMENT_CHAR = "\ufffd"  # an incomplete UTF-8 sequence: wait for the next token before showing it


@dataclasses.dataclass(frozen=True)
class RequestDelta:
    """What one step added to one request."""

    request_id: str
    token_ids: list[int]
    text: str | None  # None when the model has no tokenizer
    logprobs: list[dict[int, float]] | None  # per new token: the chosen token's and the top-n logprobs
    finished: bool
    finish_reason: str | None  # "stop", "length" or "abort" once finished


@dataclasses.dataclass
class _Detokenizer:
    """Incremental text of one request: holds back what a stop string or a split character may still change.

    `text` is the decoded output up to token `read_offset`, kept up to date by decoding only a window of the
    newest tokens (from `prefix_offset`, the window's context, which `prefix_text` decodes up to `read_offset`):
    decoding the whole output every token cost O(length) per token (31 µs at 512 tokens with HF tokenizers, per
    sequence and step).
    The window's new characters are what it decodes to past `prefix_text`, as in vLLM's incremental
    detokenizer; where a tokenizer does not extend the prefix's text that way, the whole output is decoded."""

    emitted: int = 0
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    prefix_text: str = ""


def generation_eos(path: str | os.PathLike | None) -> tuple[int, ...] | None:
    """EOS ids from `generation_config.json`, if the checkpoint has one."""
    if path is None or not (Path(path) / "generation_config.json").exists():
        return None
    eos = json.loads((Path(path) / "generation_config.json").read_text()).get("eos_token_id")
    if eos is None:
        return None
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


@dataclasses.dataclass
class Replica:
    """One attention node's share of the work: its own KV page pool and its own queues."""

    allocator: PageAllocator
    scheduler: Scheduler


def split_micro_batches(chunks: list[Chunk], m: int) -> list[list[Chunk]]:
    """Up to m contiguous, non-empty groups of sizes that differ by at most one."""
    bounds = [round(i * len(chunks) / m) for i in range(m + 1)]
    return [chunks[bounds[i]:bounds[i + 1]] for i in range(m) if bounds[i + 1] > bounds[i]]


class Engine:
    def __init__(self, model, config: EngineConfig = EngineConfig(), *, plan: DeploymentPlan | None = None,
                 tokenizer=None, eos_token_ids: tuple[int, ...] | None = None, runner=None, devices=None,
                 checkpoint: str | os.PathLike | None = None):
        """`model` is an `MoEModel`. Without a plan (or with a colocated one) the model runs as one program;
        a disaggregated plan runs attention and experts as nodes on separate device groups (`devices`, default
        all) or in node processes (which read their weights from `checkpoint` when given). `runner` replaces
        the device side (a `msjax.runtime.Runner` built for the same plan; tests use fakes)."""
        from msjax.runtime.deployment import engine_limits
        if runner is None:
            from msjax.runtime.runner import make_runner
            runner = make_runner(model, config, plan, devices, checkpoint=checkpoint)
        self.runner = runner
        self.plan = plan = plan or DeploymentPlan.colocated(1, micro_batches=1)
        self.config = config = engine_limits(config, plan)  # the plan's max_batch split over its attention nodes
        self.model_config = model.cfg
        self.micro_batches = plan.micro_batches
        self.max_model_len = config.resolved_max_model_len(model.cfg)
        self.max_pages_per_seq = -(-self.max_model_len // config.page_size)
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(model.cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.replicas = []
        for _ in range(plan.num_replicas):
            allocator = PageAllocator(config.num_pages)
            self.replicas.append(Replica(allocator, Scheduler(config, allocator)))
        self._load_window: np.ndarray | None = None  # [num_experts] tokens since the last rebalance
        self._seqs: dict[str, Sequence] = {}
        self._detok: dict[str, _Detokenizer] = {}
        self._pending: list[RequestDelta] = []
        self._seed_rng = np.random.default_rng(config.seed)

    @classmethod
    def from_pretrained(cls, model: str, *, plan: DeploymentPlan | None = None, progress=None, devices=None,
                        **engine_options) -> "Engine":
        """An HF checkpoint directory or preset name, with `EngineConfig` fields as keyword options;
        `progress(bytes_read, total_bytes)` follows the weight loading."""
        import jax.numpy as jnp

        from msjax.loading import load, resolve_model_path
        from msjax.tokenizer import load_tokenizer
        config = EngineConfig(**engine_options)
        path = resolve_model_path(model)
        loaded = load(model, dtype=jnp.float32 if config.dtype == "float32" else jnp.bfloat16, progress=progress)
        return cls(loaded, config, plan=plan, tokenizer=load_tokenizer(path), eos_token_ids=generation_eos(path),
                   devices=devices, checkpoint=path)

    def close(self) -> None:
        """Release what the runner holds (the node processes of a multi-process plan). Idempotent."""
        self.runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- requests ---

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt (text needs a tokenizer), validated against the vocabulary and the context."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("prompt", "this model has no tokenizer: pass token ids, not text")
            ids = self.tokenizer.encode(prompt).ids
        else:
            ids = list(prompt)
            if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
                raise InvalidRequestError("prompt", "token ids must be integers")
            ids = [int(t) for t in ids]
        if not ids:
            raise InvalidRequestError("prompt", "is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError("prompt", f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError("prompt", f"{len(ids)} tokens leave no room to generate within "
                                      f"max_model_len={self.max_model_len}")
        return ids

    def add_request(self, request_id: str, prompt: str | list[int], sampling: SamplingParams | None = None) -> None:
        """Queue a request. Invalid input raises `InvalidRequestError` (a ValueError naming the field) and
        leaves the engine and every other request as they were."""
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise InvalidRequestError("sampling", f"must be a SamplingParams, got {type(sampling).__name__}")
        if request_id in self._seqs:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        ids = self.encode(prompt)
        seed = sampling.seed if sampling.seed is not None else int(self._seed_rng.integers(0, 2**32))
        # data parallelism: the replica with the most free pages, then the fewest requests
        replica = max(range(len(self.replicas)), key=lambda r: (
            self.replicas[r].allocator.num_free, -len(self.replicas[r].scheduler.waiting)))
        seq = Sequence(request_id, ids, sampling, seed, replica)
        self._seqs[request_id] = seq
        self._detok[request_id] = _Detokenizer()
        self.replicas[replica].scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its pages now; the next `step` reports it finished with reason "abort".
        Returns False when no such request is unfinished."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        self.replicas[seq.replica].scheduler.finish(seq, "abort")
        self._release(seq)
        self._pending.append(RequestDelta(request_id, [], "" if self.tokenizer else None, None, True, "abort"))
        return True

    def has_unfinished(self) -> bool:
        return any(r.scheduler.has_unfinished() for r in self.replicas) or bool(self._pending)

    @property
    def stats(self) -> SchedulerStats:
        """Scheduler counters summed over replicas."""
        fields = [f.name for f in dataclasses.fields(SchedulerStats)]
        return SchedulerStats(**{f: sum(getattr(r.scheduler.stats, f) for r in self.replicas) for f in fields})

    # --- the step ---

    def step(self) -> list[RequestDelta]:
        """Schedule, run, and postprocess one step; returns a delta for every request that changed."""
        deltas, self._pending = self._pending, []
        plans = [r.scheduler.schedule() for r in self.replicas]
        if all(p is None for p in plans):
            return deltas
        parts = [split_micro_batches(p.chunks, self.micro_batches) if p else [] for p in plans]
        batches = [build_micro_batches(p.decode, node, max_num_seqs=self.config.max_num_seqs,
                                       max_num_batched_tokens=self.config.max_num_batched_tokens,
                                       max_pages_per_seq=self.max_pages_per_seq) if p else []
                   for p, node in zip(plans, parts)]
        sampled = self.runner.step(batches)
        for node, node_sampled in zip(parts, sampled):
            for part, out in zip(node, node_sampled):
                deltas += self._postprocess(part, out)
        return deltas

    def _postprocess(self, chunks: list[Chunk], sampled) -> list[RequestDelta]:
        deltas = []
        for i, chunk in enumerate(chunks):
            seq = chunk.seq
            seq.num_computed += chunk.num_tokens
            if not chunk.samples:
                continue
            token = int(sampled.tokens[i])
            seq.output_ids.append(token)
            logprobs = None
            if seq.sampling.logprobs is not None:
                top = dict(zip(sampled.top_ids[i, :seq.sampling.logprobs].tolist(),
                               sampled.top_logprobs[i, :seq.sampling.logprobs].tolist()))
                logprobs = [{token: float(sampled.logprobs[i]), **{k: v for k, v in top.items() if k != token}}]
            reason = self._stop_reason(seq, token)
            text, reason = self._new_text(seq, reason)
            if reason is not None:
                self.replicas[seq.replica].scheduler.finish(seq, reason)
                self._release(seq)
            deltas.append(RequestDelta(seq.request_id, [token], text, logprobs, reason is not None, reason))
        return deltas

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        sp = seq.sampling
        if not sp.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if sp.stop_token_ids and token in sp.stop_token_ids:
            return "stop"
        if len(seq.output_ids) >= sp.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _new_text(self, seq: Sequence, reason: str | None) -> tuple[str | None, str | None]:
        """The text this token adds, after stop strings and held-back partial characters."""
        if self.tokenizer is None:
            return None, reason
        d = self._detok[seq.request_id]
        full = self._decoded(d, seq.output_ids, final=reason is not None)
        stops = seq.sampling.stop or ()
        for stop in stops:
            at = full.find(stop, max(0, d.emitted - len(stop)))
            if at >= 0:
                full, reason = full[:at], "stop"
        if reason is None:
            # hold back what could still become a stop string or an unfinished character
            hold = max((len(s) - 1 for s in stops), default=0)
            visible = len(full) - hold
            while visible > d.emitted and full[visible - 1] == REPLACEMENT_CHAR:
                visible -= 1
            full = full[:max(visible, d.emitted)]
        new, d.emitted = full[d.emitted:], max(d.emitted, len(full))
        return new, reason

    def _decoded(self, d: _Detokenizer, ids: list[int], final: bool) -> str:
        """The text of `ids` (all of a request's output so far), decoding the window past d.prefix_offset. The
        window moves on unless it ends in an unfinished character (the caller holds that back) and more tokens
        may come (`final` False)."""
        window = self.tokenizer.decode(ids[d.prefix_offset:], skip_special_tokens=True)
        if window.startswith(d.prefix_text):
            full = d.text + window[len(d.prefix_text):]
        else:  # this tokenizer's text of the window does not extend its prefix's: decode it all
            full = self.tokenizer.decode(ids, skip_special_tokens=True)
        if final or not window.endswith(REPLACEMENT_CHAR):
            d.text, d.prefix_offset, d.read_offset = full, d.read_offset, len(ids)
            d.prefix_text = self.tokenizer.decode(ids[d.prefix_offset:d.read_offset], skip_special_tokens=True)
        return full

    def _release(self, seq: Sequence) -> None:
        del self._seqs[seq.request_id]
        del self._detok[seq.request_id]

    # --- expert load balancing (disaggregated plans) ---

    def rebalance(self, *, redundancy: int = 0, min_cost: float = 0.0):
        """Re-place the experts for the load seen since the last rebalance (paper §6): `redundancy` extra
        replicas of hot experts, their tokens split by the balancer's shares. Runs between steps and moves
        expert weights only; requests in flight continue unchanged. Returns the `ExpertPlacement`."""
        from msjax.balance import ExpertPlacement, place_experts
        if self.plan.is_colocated:
            raise InvalidRequestError("plan", "rebalancing needs a disaggregated plan (expert nodes)")
        self.collect_expert_load()
        load, self._load_window = self._load_window, None
        lost = set(self.runner.health().lost)  # expert nodes gone from the deployment hold nothing
        live = [n for n in range(self.plan.expert_nodes) if n not in lost]
        found = place_experts(load, len(live), redundancy=redundancy, min_cost=min_cost)
        nodes, shares = [()] * self.plan.expert_nodes, [()] * self.plan.expert_nodes
        for i, n in enumerate(live):
            nodes[n], shares[n] = found.nodes[i], found.shares[i]
        placement = ExpertPlacement(tuple(nodes), tuple(shares), found.num_experts)
        self.runner.set_placement(placement.nodes, placement.shares)
        return placement

    def collect_expert_load(self):
        """Tokens routed to each expert (summed over layers) since the previous call, shape [num_experts], or
        None when the runner counts none. The engine is the runner's only reader (reading resets the runner's
        counter): what this returns also goes into the window the next `rebalance` places for, so a metrics
        exporter calling this does not take the balancer's load away."""
        delta = self.runner.expert_load()
        if delta is None:
            return None
        delta = np.asarray(delta)
        self._load_window = delta.copy() if self._load_window is None else self._load_window + delta
        return delta

    def discard_expert_load(self) -> None:
        """Forget the expert load counted so far (after a warm-up: padding, not traffic)."""
        self.runner.expert_load()
        self._load_window = None

    def warm_up(self, progress=None) -> int:
        """Compile every step shape this engine can run, on padding (`msjax.engine.warmup`); the engine must be
        idle. `progress(done, total)` follows the steps; returns how many ran."""
        from msjax.engine.warmup import warm_up
        return warm_up(self, progress)

    def num_free_pages(self) -> int:
        return sum(r.allocator.num_free for r in self.replicas)

    def num_total_pages(self) -> int:
        return sum(r.allocator.num_pages for r in self.replicas)

    def num_running(self) -> int:
        return sum(len(r.scheduler.running) for r in self.replicas)

    def num_waiting(self) -> int:
        return sum(len(r.scheduler.waiting) for r in self.replicas)


__all__ = ["Engine", "RequestDelta", "Status"]
