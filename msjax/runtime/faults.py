"""Losing an expert node, device-free: where its experts go (`degrade`) and what the runner counts (`FaultStats`).

Attention nodes hold every request's KV cache, so an expert node's loss loses no request state, only the
weights of its experts. `degrade` takes the lost nodes out of the placement: an expert that has a replica on a
live node is served there alone from the next step (re-route: no weights move); one that had none is loaded onto
the live node holding the fewest experts (rebuild, from the checkpoint). The runner re-runs the step that was in
flight with the new placement (`msjax.runtime.node_runner`).
"""

from __future__ import annotations

import dataclasses
import time

from msjax.errors import ConfigError

Placement = tuple[tuple[int, ...], ...]


@dataclasses.dataclass(frozen=True)
class Degraded:
    """The placement without the lost nodes (they hold nothing), each live node's shares, and which live nodes
    must load experts they did not hold (node -> every expert it holds afterwards)."""

    placement: Placement
    shares: tuple[tuple[float, ...], ...] | None
    loads: dict[int, tuple[int, ...]]


def degrade(placement: Placement, shares, lost: set[int] | frozenset[int], num_experts: int) -> Degraded:
    """`placement` (each expert node's experts; nodes already lost hold ()) without the nodes `lost`. Raises a
    ConfigError when no node is left."""
    lost = set(lost)
    live = [node for node in range(len(placement)) if node not in lost and placement[node]]
    if not live:
        raise ConfigError("placement", f"every expert node is lost ({', '.join(map(str, sorted(lost)))})")
    nodes = [list(experts) if node in live else [] for node, experts in enumerate(placement)]
    held = {e for node in live for e in nodes[node]}
    added: dict[int, list[int]] = {}
    for expert in range(num_experts):
        if expert in held:
            continue
        node = min(live, key=lambda n: (len(nodes[n]), n))  # the live node holding the fewest experts
        nodes[node].append(expert)
        added.setdefault(node, []).append(expert)
    new_shares = None
    if shares is not None:  # the kept replicas keep their shares; a rebuilt expert serves all of its tokens
        new_shares = tuple(tuple(shares[node][:len(placement[node])]) + (1.0,) * len(added.get(node, ()))
                           if node in live else () for node in range(len(placement)))
    return Degraded(tuple(tuple(n) for n in nodes), new_shares, {node: tuple(nodes[node]) for node in added})


def rebuilt_experts(before: Placement, after: Degraded) -> tuple[int, ...]:
    """The experts `after` loads again (no live replica held them)."""
    return tuple(sorted(e for node, experts in after.loads.items() for e in experts if e not in before[node]))


@dataclasses.dataclass
class FaultStats:
    """What the runner counts about lost expert nodes (read by /metrics and /health)."""

    faults: int = 0  # expert nodes lost
    rerun_steps: int = 0  # steps run again after a loss found mid-step
    rebuilds: int = 0  # losses that loaded experts again (no live replica)
    rebuild_s: float = 0.0  # time spent loading them, in all
    degraded_steps: int = 0  # steps run with fewer expert nodes than the plan has
    degraded_tokens: int = 0  # tokens sampled in those steps
    rejoins: int = 0  # lost expert nodes started again
    events: list = dataclasses.field(default_factory=list)  # (monotonic time, text) of each loss and recovery

    def event(self, text: str) -> None:
        self.events.append((time.monotonic(), text))

    def snapshot(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "events"}
