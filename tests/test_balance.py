"""Expert load balancing (paper §6): greedy redundant placement against brute force and on a Zipf trace."""

import itertools

import numpy as np
import pytest

from msjax.balance import (ExpertPlacement, balanced_shares, contiguous_placement, expert_costs, imbalance,
                           node_loads, place_experts, replica_counts, split_tokens, zipf_tokens)
from msjax.config import DeploymentPlan
from msjax.errors import ConfigError
from tests.model_utils import tiny_config


def _optimal_split_max(costs, nodes) -> float:
    """The best max load over fractional splits of a fixed placement, by Hall's condition:
    max over node sets S of (cost of experts held only inside S) / |S|. Independent of the max-flow code."""
    n = len(nodes)
    best = 0.0
    for k in range(1, n + 1):
        for subset in itertools.combinations(range(n), k):
            inside = sum(c for i, c in enumerate(costs)
                         if all(j in subset for j in range(n) if i in nodes[j]))
            best = max(best, inside / k)
    return best


def _brute_force_optimum(costs, num_nodes: int, redundancy: int) -> float:
    """Every placement with the same slots per node as place_experts, each with its best split."""
    num_experts, slots = len(costs), len(costs) + redundancy
    capacity = [slots // num_nodes + (j < slots % num_nodes) for j in range(num_nodes)]
    subsets = [s for k in range(1, num_nodes + 1) for s in itertools.combinations(range(num_nodes), k)]
    best = np.inf
    for choice in itertools.product(subsets, repeat=num_experts):
        if [sum(j in s for s in choice) for j in range(num_nodes)] != capacity:
            continue
        nodes = [[i for i in range(num_experts) if j in choice[i]] for j in range(num_nodes)]
        best = min(best, _optimal_split_max(costs, nodes))
    return best


@pytest.mark.parametrize("tokens, num_nodes, redundancy, optimum", [
    ([8, 2, 1, 1], 2, 0, 9.0),  # the hot expert shares a node with the coldest
    ([8, 2, 1, 1], 2, 2, 6.0),  # replicas of experts 0 and 1 on both nodes: perfect balance
    ([10, 3, 3, 2, 2, 1], 3, 0, 11.0),  # two slots per node: the hot expert takes the coldest along
    ([12, 1, 1, 1, 1], 3, 2, 16 / 3),  # the hot expert on all three nodes, its tokens split unevenly
])
def test_small_cases_reach_the_brute_force_optimum(tokens, num_nodes, redundancy, optimum):
    placement = place_experts(tokens, num_nodes, redundancy=redundancy)
    assert _brute_force_optimum(tokens, num_nodes, redundancy) == pytest.approx(optimum)
    assert node_loads(tokens, placement).max() == pytest.approx(optimum, rel=1e-5)


def test_greedy_stays_close_to_the_optimum_on_random_small_cases():
    rng = np.random.default_rng(7)
    ratios = []
    for _ in range(25):
        num_experts, num_nodes, redundancy = int(rng.integers(3, 6)), int(rng.integers(2, 4)), int(rng.integers(0, 3))
        costs = (rng.zipf(1.5, size=num_experts) + rng.random(num_experts)).tolist()
        greedy = node_loads(costs, place_experts(costs, num_nodes, redundancy=redundancy)).max()
        ratios.append(greedy / _brute_force_optimum(costs, num_nodes, redundancy))
    assert min(ratios) >= 1 - 1e-6  # never better than the optimum: the checks agree
    assert max(ratios) <= 1.2 and np.mean(ratios) <= 1.05  # a greedy approximation, as in the paper


def test_balanced_shares_match_halls_bound():
    rng = np.random.default_rng(3)
    for _ in range(10):
        costs = rng.random(6) * 10
        nodes = [sorted(rng.choice(6, size=3, replace=False).tolist()) for _ in range(3)]
        nodes[0] = sorted(set(nodes[0]) | (set(range(6)) - {e for n in nodes for e in n}))  # cover every expert
        placement = ExpertPlacement(tuple(map(tuple, nodes)), balanced_shares(costs, nodes), 6)
        assert node_loads(costs, placement).max() == pytest.approx(_optimal_split_max(costs, nodes), rel=1e-5)


def test_zipf_trace_imbalance_before_and_after():
    """Top-4 of 32 experts, Zipf(1.2) popularity, 8 nodes: max/mean node load for several budgets."""
    tokens = zipf_tokens(32, 4, 8192, alpha=1.2)
    assert tokens.sum() == 4 * 8192 and tokens.max() > 4 * tokens.mean()
    before = imbalance(node_loads(tokens, contiguous_placement(32, 8)))
    after = {r: imbalance(node_loads(tokens, place_experts(tokens, 8, redundancy=r))) for r in (0, 2, 4, 8, 16)}
    assert before > 2.0
    assert after[0] < before and after[2] < 1.15 and after[4] < 1.01 and after[16] < 1.001
    budgets = sorted(after)
    assert all(after[b] <= after[a] + 1e-6 for a, b in zip(budgets, budgets[1:]))
    # with a cost floor K the balancer counts cold experts at K and still balances
    floored = place_experts(tokens, 8, redundancy=4, min_cost=400)
    assert imbalance(node_loads(tokens, floored, min_cost=400)) < 1.01


def test_placement_is_a_valid_deployment_placement():
    tokens = zipf_tokens(16, 4, 2048, alpha=1.0, seed=1)
    placement = place_experts(tokens, 4, redundancy=4)
    assert [len(n) for n in placement.nodes] == [5, 5, 5, 5]  # (16 + 4) / 4 slots per node, all used
    assert placement.replicas().sum() == 20 and placement.replicas().max() <= 4
    plan = DeploymentPlan(attention_tp=1, expert_nodes=4, placement=placement.nodes)
    plan.validate(tiny_config(num_experts=16, top_k=4), plan.num_devices)


def test_split_tokens_serves_every_token_on_nodes_that_hold_the_expert():
    tokens = np.array([101, 7, 0, 30, 3])
    placement = place_experts(tokens, 3, redundancy=2)
    split = split_tokens(tokens, placement)  # [nodes, experts]
    assert split.shape == (3, 5) and (split >= 0).all()
    np.testing.assert_array_equal(split.sum(axis=0), tokens)
    held = placement.share_matrix().T > 0
    assert (split[~held] == 0).all()
    np.testing.assert_allclose(split.sum(axis=1), node_loads(tokens, placement), atol=placement.num_experts)


def test_costs_floor_and_replica_counts():
    np.testing.assert_array_equal(expert_costs([5, 50, 0], min_cost=10), [10, 50, 10])
    np.testing.assert_array_equal(replica_counts([100, 10, 10], 6, num_nodes=3), [3, 2, 1])  # at most 1 per node
    cold = place_experts([0, 0, 0, 0], 2, min_cost=1)
    assert node_loads([0, 0, 0, 0], cold, min_cost=1).tolist() == [2.0, 2.0]


@pytest.mark.parametrize("kwargs, field", [
    (dict(tokens=[1, 2], num_nodes=3), "redundancy"),  # a node would hold nothing
    (dict(tokens=[1, 2], num_nodes=2, redundancy=3), "redundancy"),  # more replicas than nodes per expert
    (dict(tokens=[1, 2], num_nodes=2, redundancy=-1), "redundancy"),
    (dict(tokens=[1, -2], num_nodes=1), "tokens"),
    (dict(tokens=[1, 2], num_nodes=0), "num_nodes"),
])
def test_bad_inputs_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        place_experts(kwargs.pop("tokens"), **kwargs)
    assert err.value.field == field


def test_placement_validation():
    with pytest.raises(ConfigError, match="missing"):
        ExpertPlacement(((0,), (1,)), ((1.0,), (1.0,)), 3)
    with pytest.raises(ConfigError, match="sum to 1"):
        ExpertPlacement(((0, 1), (1,)), ((1.0, 0.5), (0.4,)), 2)
    with pytest.raises(ConfigError, match="tokens"):
        node_loads([1, 2, 3], contiguous_placement(2, 2))
