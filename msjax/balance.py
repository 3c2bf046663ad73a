"""Expert load balancing with redundant replicas (paper §6).

Real traffic makes some experts hot. Given each expert's recent load, place M experts (plus a budget of extra
replicas of the hot ones) on N expert nodes to minimise the busiest node's cost

    max_j C_j,   C_j = sum_i x_ij · max(a_i, K),   sum_j x_ij = 1,

where a_i is the cost of expert i's active tokens, K the lowest cost of any expert (a cold expert still reads
its weights: in tokens, about the roofline knee of the expert GEMM), and x_ij the share of expert i's tokens
that node j serves (0 where node j holds no replica of i). The paper solves it with a greedy approximation:

1. replicas: every extra replica goes to the expert with the highest cost per replica;
2. placement: replicas in decreasing cost per replica, each expert's onto the least-loaded nodes that have a
   free slot (slots per node = (M + budget) / N, the memory each node reserves), falling back to the nodes with
   the most free slots when the least-loaded choice would leave a later expert without enough distinct nodes;
   then swaps between the busiest node and the others while they lower its load;
3. split: with the placement fixed, the shares x_ij that minimise the maximum load exactly (a max-flow per
   candidate maximum, bisected).

Costs are in tokens here; multiply by the expert's per-token time for seconds. Pure NumPy and Python: the
runtime that moves weights and routes tokens to replicas uses `ExpertPlacement` and `split_tokens`.
"""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np

from msjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ExpertPlacement:
    """Which experts each node holds and the share of each expert's tokens that each replica serves."""

    nodes: tuple[tuple[int, ...], ...]  # experts held by node j: DeploymentPlan.placement's format
    shares: tuple[tuple[float, ...], ...]  # x_ij, aligned with `nodes`; each expert's shares sum to 1
    num_experts: int

    def __post_init__(self):
        if len(self.nodes) != len(self.shares) or any(len(n) != len(s) for n, s in zip(self.nodes, self.shares)):
            raise ConfigError("shares", "must align with nodes: one share per expert a node holds")
        if any(len(set(node)) != len(node) for node in self.nodes):
            raise ConfigError("placement", "a node holds the same expert twice")
        held = {e for node in self.nodes for e in node}
        if held != set(range(self.num_experts)):
            raise ConfigError("placement", f"must hold every expert 0..{self.num_experts - 1} exactly where listed; "
                              f"missing {sorted(set(range(self.num_experts)) - held)}, "
                              f"unknown {sorted(held - set(range(self.num_experts)))}")
        totals = self.share_matrix().sum(axis=1)
        if np.any(self.share_matrix() < -1e-12) or not np.allclose(totals, 1.0, atol=1e-6):
            raise ConfigError("shares", f"each expert's shares must be >= 0 and sum to 1, got sums {totals}")

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    def share_matrix(self) -> np.ndarray:
        """x: [num_experts, num_nodes]."""
        x = np.zeros((self.num_experts, len(self.nodes)))
        for j, (experts, shares) in enumerate(zip(self.nodes, self.shares)):
            x[list(experts), j] = shares
        return x

    def replicas(self) -> np.ndarray:
        """Replicas of each expert: [num_experts]."""
        counts = np.zeros(self.num_experts, int)
        for experts in self.nodes:
            counts[list(experts)] += 1
        return counts


def expert_costs(tokens, min_cost: float = 0.0) -> np.ndarray:
    """max(a_i, K) for every expert."""
    return np.maximum(np.asarray(tokens, float), min_cost)


def node_loads(tokens, placement: ExpertPlacement, min_cost: float = 0.0) -> np.ndarray:
    """C_j = sum_i x_ij · max(a_i, K): the cost each node carries, [num_nodes]."""
    tokens = np.asarray(tokens, float)
    if tokens.shape != (placement.num_experts,):
        raise ConfigError("tokens", f"needs one count per expert ({placement.num_experts}), got {tokens.shape}")
    return expert_costs(tokens, min_cost) @ placement.share_matrix()


def imbalance(loads) -> float:
    """max / mean of the nodes' loads: 1.0 is perfect balance."""
    loads = np.asarray(loads, float)
    return float(loads.max() / loads.mean()) if loads.mean() > 0 else 1.0


def split_tokens(tokens, placement: ExpertPlacement) -> np.ndarray:
    """Whole tokens of each expert that each node serves, [num_nodes, num_experts]: a hot expert's tokens split
    over its replicas by the placement's shares, rounded so that every expert's tokens are all served."""
    tokens = np.asarray(tokens)
    if tokens.shape != (placement.num_experts,) or np.any(tokens < 0) or np.any(tokens != np.round(tokens)):
        raise ConfigError("tokens", f"needs {placement.num_experts} non-negative whole counts, got {tokens!r}")
    x = placement.share_matrix()  # [E, N]
    exact = x * tokens[:, None]
    out = np.floor(exact + 1e-9).astype(int)
    for i in range(placement.num_experts):  # largest remainders take the tokens that rounding dropped
        missing = int(tokens[i]) - out[i].sum()
        if missing:
            order = np.argsort(-(exact[i] - out[i]) - 2 * (x[i] > 0))  # only nodes that hold expert i
            out[i, order[:missing]] += 1
    return out.T


def contiguous_placement(num_experts: int, num_nodes: int) -> ExpertPlacement:
    """No balancing: contiguous blocks of experts, one replica each (DeploymentPlan's default placement)."""
    if not 1 <= num_nodes <= num_experts:
        raise ConfigError("num_nodes", f"must be in [1, {num_experts}] for {num_experts} experts, got {num_nodes}")
    bounds = [round(j * num_experts / num_nodes) for j in range(num_nodes + 1)]
    nodes = tuple(tuple(range(bounds[j], bounds[j + 1])) for j in range(num_nodes))
    return ExpertPlacement(nodes, tuple((1.0,) * len(n) for n in nodes), num_experts)


def replica_counts(costs, num_slots: int, num_nodes: int) -> np.ndarray:
    """Step 1: one replica each, then every extra slot to the expert with the highest cost per replica (at most
    one replica per node)."""
    costs = np.asarray(costs, float)
    counts = np.ones(len(costs), int)
    for _ in range(num_slots - len(costs)):
        per_replica = np.where(counts < num_nodes, costs / counts, -np.inf)
        counts[int(np.argmax(per_replica))] += 1
    return counts


def _fits(replicas, free: np.ndarray) -> bool:
    """Gale-Ryser: experts needing `replicas` distinct nodes fit nodes with `free` slots."""
    demand = np.sort(np.asarray(replicas, int))[::-1]
    return all(demand[:k].sum() <= np.minimum(free, k).sum() for k in range(1, len(demand) + 1))


def _place(costs: np.ndarray, counts: np.ndarray, capacity: np.ndarray) -> list[list[int]]:
    """Step 2: each expert's replicas on distinct nodes, least-loaded first while the rest still fits."""
    num_nodes = len(capacity)
    load, free = np.zeros(num_nodes), capacity.astype(int).copy()
    nodes: list[list[int]] = [[] for _ in range(num_nodes)]
    order = sorted(range(len(costs)), key=lambda i: (-costs[i] / counts[i], -counts[i], i))
    for position, i in enumerate(order):
        open_nodes = [j for j in range(num_nodes) if free[j] > 0]
        chosen = sorted(open_nodes, key=lambda j: (load[j], -free[j], j))[:counts[i]]
        rest = [counts[k] for k in order[position + 1:]]
        after = free.copy()
        after[chosen] -= 1
        if not _fits(rest, after):  # the nodes with the most free slots always keep it feasible
            chosen = sorted(open_nodes, key=lambda j: (-free[j], load[j], j))[:counts[i]]
        for j in chosen:
            nodes[j].append(i)
            free[j] -= 1
            load[j] += costs[i] / counts[i]
    return nodes


def _improve_by_swaps(costs: np.ndarray, counts: np.ndarray, nodes: list[list[int]]) -> list[list[int]]:
    """Swap one replica of the busiest node with one of another node while that lowers the busier of the
    two (slots per node stay the same). Loads use equal shares per replica; the exact split comes after."""
    per_replica = costs / counts
    load = np.array([per_replica[node].sum() for node in nodes])
    for _ in range(len(costs) * len(nodes) * 4):  # each swap strictly lowers the pair's maximum
        busiest = int(np.argmax(load))
        best = None
        for k in range(len(nodes)):
            if k == busiest:
                continue
            for a in nodes[busiest]:
                for b in nodes[k]:
                    if a in nodes[k] or b in nodes[busiest]:
                        continue
                    delta = per_replica[a] - per_replica[b]
                    peak = max(load[busiest] - delta, load[k] + delta)
                    if peak < load[busiest] - 1e-12 and (best is None or peak < best[0]):
                        best = (peak, k, a, b)
        if best is None:
            break
        _, k, a, b = best
        nodes[busiest][nodes[busiest].index(a)] = b
        nodes[k][nodes[k].index(b)] = a
        delta = per_replica[a] - per_replica[b]
        load[busiest] -= delta
        load[k] += delta
    return nodes


def _max_flow(capacity: np.ndarray, source: int, sink: int) -> np.ndarray:
    """Dinic's algorithm on a dense capacity matrix; returns the flow matrix."""
    n = len(capacity)
    flow = np.zeros_like(capacity)
    eps = 1e-12 * max(1.0, float(capacity[source].sum()))
    while True:
        level = np.full(n, -1)
        level[source] = 0
        queue = deque([source])
        while queue:
            u = queue.popleft()
            for v in np.nonzero((capacity[u] - flow[u] > eps) & (level < 0))[0]:
                level[v] = level[u] + 1
                queue.append(v)
        if level[sink] < 0:
            return flow
        next_edge = [0] * n

        def push(u: int, limit: float) -> float:
            if u == sink:
                return limit
            neighbours = np.nonzero(capacity[u] - flow[u] > eps)[0]
            while next_edge[u] < len(neighbours):
                v = neighbours[next_edge[u]]
                if level[v] == level[u] + 1:
                    sent = push(v, min(limit, capacity[u, v] - flow[u, v]))
                    if sent > eps:
                        flow[u, v] += sent
                        flow[v, u] -= sent
                        return sent
                next_edge[u] += 1
            return 0.0

        while (sent := push(source, np.inf)) > eps:
            pass


def balanced_shares(costs, nodes: list[list[int]] | tuple[tuple[int, ...], ...], *,
                    tolerance: float = 1e-6) -> tuple[tuple[float, ...], ...]:
    """Step 3: shares x_ij over the given placement that minimise max_j C_j (to `tolerance`, relative).

    For a candidate maximum T the shares exist iff a flow source -> expert i (capacity c_i) -> nodes holding i
    -> sink (capacity T) carries every c_i; T is bisected between the mean and the equal-split maximum."""
    costs = np.asarray(costs, float)
    num_experts, num_nodes = len(costs), len(nodes)
    holders = [[j for j in range(num_nodes) if i in nodes[j]] for i in range(num_experts)]
    equal = np.zeros((num_experts, num_nodes))
    for i, js in enumerate(holders):
        equal[i, js] = 1 / len(js)
    total = costs.sum()
    if total <= 0:
        return tuple(tuple(equal[i, j] for i in node) for j, node in enumerate(nodes))
    size = num_experts + num_nodes + 2
    source, sink = size - 2, size - 1
    graph = np.zeros((size, size))
    graph[source, :num_experts] = costs
    for i, js in enumerate(holders):
        graph[i, [num_experts + j for j in js]] = total
    low, high = total / num_nodes, float((costs @ equal).max())
    best = equal * costs[:, None]
    while high - low > tolerance * high:
        middle = (low + high) / 2
        graph[num_experts:num_experts + num_nodes, sink] = middle
        flow = _max_flow(graph, source, sink)
        if flow[source].sum() >= total * (1 - 1e-12):
            high, best = middle, flow[:num_experts, num_experts:num_experts + num_nodes].clip(min=0)
        else:
            low = middle
    x = np.where(costs[:, None] > 0, best / np.where(costs > 0, costs, 1)[:, None], equal)
    x /= x.sum(axis=1, keepdims=True)
    return tuple(tuple(float(x[i, j]) for i in node) for j, node in enumerate(nodes))


def place_experts(tokens, num_nodes: int, *, redundancy: int = 0, min_cost: float = 0.0) -> ExpertPlacement:
    """Greedy placement of len(tokens) experts and `redundancy` extra replicas on `num_nodes` nodes, balancing
    max(a_i, K) = max(tokens_i, min_cost) (paper §6). `tokens` is each expert's load over a recent window."""
    tokens = np.asarray(tokens, float)
    if tokens.ndim != 1 or len(tokens) == 0 or np.any(tokens < 0):
        raise ConfigError("tokens", f"needs one non-negative load per expert, got {tokens!r}")
    costs = expert_costs(tokens, min_cost)
    num_experts = len(costs)
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ConfigError("num_nodes", f"must be a positive integer, got {num_nodes!r}")
    if isinstance(redundancy, bool) or not isinstance(redundancy, int) or redundancy < 0:
        raise ConfigError("redundancy", f"must be an integer >= 0, got {redundancy!r}")
    slots = num_experts + redundancy
    if slots < num_nodes:
        raise ConfigError("redundancy", f"{num_experts} experts + {redundancy} replicas leave some of the "
                          f"{num_nodes} nodes empty; raise the redundancy budget to at least {num_nodes - num_experts}")
    if slots > num_experts * num_nodes:
        raise ConfigError("redundancy", f"at most {num_experts * (num_nodes - 1)} extra replicas fit: one replica "
                          f"of each expert per node")
    capacity = np.full(num_nodes, slots // num_nodes) + (np.arange(num_nodes) < slots % num_nodes)
    counts = replica_counts(costs, slots, num_nodes)
    nodes = _improve_by_swaps(costs, counts, _place(costs, counts, capacity))
    nodes = [sorted(node) for node in nodes]
    return ExpertPlacement(tuple(tuple(n) for n in nodes), balanced_shares(costs, nodes), num_experts)


def zipf_tokens(num_experts: int, top_k: int, num_tokens: int, alpha: float, seed: int = 0) -> np.ndarray:
    """A synthetic skewed routing trace for studies and tests: tokens per expert when expert popularity follows
    Zipf(alpha) in a random order and each token picks top_k distinct experts (Gumbel top-k sampling)."""
    rng = np.random.default_rng(seed)
    popularity = rng.permutation(1 / np.arange(1, num_experts + 1) ** alpha)
    keys = np.log(popularity)[None, :] + rng.gumbel(size=(num_tokens, num_experts))
    chosen = np.argpartition(-keys, top_k, axis=1)[:, :top_k]
    return np.bincount(chosen.ravel(), minlength=num_experts)
