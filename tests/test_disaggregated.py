"""Disaggregated expert parallelism on 8 forced CPU devices: every plan gives the single-device results, only
routed rows move, and each expert node holds only its experts."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msjax import SamplingParams
from msjax.checkpoint import load_model
from msjax.config import DeploymentPlan, EngineConfig
from msjax.engine.engine import Engine
from msjax.loading import load
from msjax.models.programs import MoEModel
from tests.model_utils import assert_same_outputs, run_requests, tiny_config

OPTIONS = dict(page_size=8, num_pages=24, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=96)
PLANS = {  # (n_a, tp_a, E, tp_e, m) from the issue
    "1-1-1-1-1": DeploymentPlan(1, 1, 1, 1, 1),
    "2-1-2-1-2": DeploymentPlan(2, 1, 2, 1, 2),
    "4-1-4-1-3": DeploymentPlan(4, 1, 4, 1, 3),
    "1-2-2-1-2": DeploymentPlan(1, 2, 2, 1, 2),
    "2-1-1-2-4": DeploymentPlan(2, 1, 1, 2, 4),
    "1-1-4-1-4": DeploymentPlan(1, 1, 4, 1, 4),
    "2-2-2-2-2": DeploymentPlan(2, 2, 2, 2, 2),
    "1-1-2-2-3": DeploymentPlan(1, 1, 2, 2, 3),
    "colocated-8": DeploymentPlan.colocated(8),
}
QUICK = {"2-2-2-2-2"}  # tp and dp on both roles, m = 2: the quick subset stays under 5 minutes


def _models():
    return {"mixtral": load("tiny-moe"),
            "qwen3_moe": load_model(Path(__file__).parent / "fixtures" / "hf" / "qwen3_moe")}


MODELS = {}


def model(name) -> MoEModel:
    if not MODELS:
        MODELS.update(_models())
    return MODELS[name]


def _requests(cfg):
    rng = np.random.default_rng(1)
    reqs = []
    for i, n in enumerate([3, 17, 40, 1, 9, 25]):  # 40 > the 32-token budget: chunked prefill
        prompt = rng.integers(0, cfg.vocab_size, size=n).tolist()
        reqs.append((f"r{i}", prompt, SamplingParams(max_tokens=6, temperature=0.0, logprobs=4, ignore_eos=True)))
    return reqs


def _run(engine, requests):
    out = run_requests(engine, requests)
    assert engine.num_free_pages() == engine.num_total_pages()
    return out


REFERENCE = {}


def reference(family):
    if family not in REFERENCE:
        m = model(family)
        REFERENCE[family] = _run(Engine(m, EngineConfig(**OPTIONS)), _requests(m.cfg))
    return REFERENCE[family]


@pytest.mark.parametrize("family,plan_name", [
    # the quick subset runs the quick plans on one family; the full suite every plan on both
    pytest.param(f, p, marks=() if p in QUICK and f == "mixtral" else pytest.mark.slow)
    for p in PLANS for f in ("mixtral", "qwen3_moe")])
def test_plan_matches_single_device(family, plan_name):
    assert len(jax.devices()) == 8
    m = model(family)
    engine = Engine(m, EngineConfig(**OPTIONS), plan=PLANS[plan_name])
    assert_same_outputs(_run(engine, _requests(m.cfg)), reference(family))


@pytest.mark.slow
@pytest.mark.parametrize("plan_name", [p for p in PLANS if p != "1-1-1-1-1"])
def test_tiny_moe_reproduces_its_text_through_every_plan(plan_name):
    from tests.test_tiny_moe import ZEN
    engine = Engine.from_pretrained("tiny-moe", plan=PLANS[plan_name], **OPTIONS)
    lines = ZEN.splitlines(keepends=True)
    want = "".join(lines[5:7])
    engine.add_request("zen", lines[4], SamplingParams(max_tokens=len(engine.tokenizer.encode(want).ids),
                                                     temperature=0))
    text = ""
    while engine.has_unfinished():
        text += "".join(d.text for d in engine.step())
    assert text == want


@pytest.mark.slow  # the quick subset stays under 5 minutes
def test_only_routed_rows_move_and_experts_stay_home():
    m = model("mixtral")
    plan = DeploymentPlan(attention_nodes=2, expert_nodes=4, micro_batches=2)
    engine = Engine(m, EngineConfig(**OPTIONS), plan=plan)
    runner = engine.runner
    placement = plan.expert_placement(m.cfg.num_experts)
    for e in range(plan.expert_nodes):
        node = runner.node("expert", e)
        for leaf in jax.tree.leaves(node.layers):  # only this node's experts, only on this node's devices
            assert leaf.shape[:2] == (1, len(placement[e])) and len(placement[e]) == 2
            assert leaf.devices() <= set(node.mesh.devices.flat)
        full = np.asarray(m.expert_state["w_down"][...])
        held = np.concatenate([np.asarray(state["w_down"][...]) for state in node.layers])  # [layers, experts, ...]
        np.testing.assert_array_equal(held, full[:, list(placement[e])])
    runner.record_traffic()
    _run(engine, _requests(m.cfg)[:4])
    assert runner.traffic
    k = m.cfg.top_k
    for rec in runner.traffic:
        ids, valid = np.asarray(rec["topk_ids"]), np.asarray(rec["valid"])
        routed = {t * k + j: int(ids[t, j]) for t in np.flatnonzero(valid) for j in range(k)}
        moved = {}
        for node, (order, count) in enumerate(zip(rec["orders"], rec["counts"])):
            order = np.asarray(order)
            real = order[order >= 0]
            assert len(real) == int(count)  # the row count on the device is the number of real rows
            for a in real:
                assert a not in moved, "an assignment moved twice"
                moved[int(a)] = node
        # exactly the routed (token, expert) assignments moved, each to the node holding its expert
        assert moved.keys() == routed.keys()
        assert all(routed[a] in placement[node] for a, node in moved.items())


def _skewed_model(top_k: int, hot: int) -> MoEModel:
    """A random model whose router sends every token to expert `hot` first."""
    m = MoEModel.random(tiny_config(vocab_size=64, num_experts=4, top_k=top_k, max_position_embeddings=128),
                        seed=5)
    router = m.attention_state["router"][...]
    m.attention_state["router"].set_value(router.at[:, :, hot].add(50.0))
    return m


@pytest.mark.slow
@pytest.mark.parametrize("top_k", [1, 2])
def test_routing_extremes(top_k):
    """Every token to one expert (top-1: three experts receive nothing), one sequence split into 4
    micro-batches (m larger than the running sequences)."""
    m = _skewed_model(top_k, hot=3)
    reqs = [("one", [5, 9, 2, 7, 1], SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True))]
    want = _run(Engine(m, EngineConfig(**OPTIONS)), reqs)
    got = _run(Engine(m, EngineConfig(**OPTIONS), plan=DeploymentPlan(1, 1, 2, 1, 4)), reqs)
    assert_same_outputs(got, want)


def test_plan_errors_name_the_problem():
    cfg = model("mixtral").cfg
    from msjax.errors import ConfigError
    with pytest.raises(ConfigError, match="needs 9 devices, only 8"):
        DeploymentPlan(attention_nodes=1, expert_nodes=8).validate(cfg, 8)
    with pytest.raises(ConfigError, match="attention_tp: 3 neither divides"):
        DeploymentPlan(attention_tp=3).validate(cfg, 8)
    with pytest.raises(ConfigError, match="micro_batches"):
        DeploymentPlan(micro_batches=0)
    with pytest.raises(ConfigError, match="9 expert nodes for 8 experts"):
        DeploymentPlan(expert_nodes=9).validate(cfg, 16)
    with pytest.raises(ConfigError, match=r"experts \[7\] are on no expert node"):
        DeploymentPlan(expert_nodes=2, placement=((0, 1, 2), (3, 4, 5, 6))).validate(cfg, 8)
    with pytest.raises(ConfigError, match="transport: 'rdma' needs .*(RDMA verbs device|verbs transport).*"
                                          "transports that work here"):  # no RDMA device on this machine
        Engine(model("mixtral"), EngineConfig(**OPTIONS), plan=DeploymentPlan(expert_nodes=2, transport="rdma"))
    plan = DeploymentPlan(2, 2, 2, 2, 3, placement=((0, 1, 2, 3), (4, 5, 6, 7)))
    assert DeploymentPlan.from_toml(plan.to_toml()) == plan
    with pytest.raises(ConfigError, match="unknown plan field"):
        DeploymentPlan.from_toml("[plan]\nattention_node = 2\n")


@pytest.mark.slow
def test_timeline_from_the_device_trace(tmp_path):
    import json

    from msjax.runtime.timeline import Timeline
    m = model("mixtral")
    engine = Engine(m, EngineConfig(**OPTIONS), plan=DeploymentPlan(1, 1, 1, 1, 2))
    for rid, prompt, sp in _requests(m.cfg)[:4]:
        engine.add_request(rid, prompt, sp)
    while engine.stats.num_decode_steps < 1:  # prefill and a first (compiling) decode step
        engine.step()
    timeline = Timeline()
    engine.runner.attach_timeline(timeline)
    with timeline.trace(tmp_path / "profile"):
        engine.step()
    layers = m.cfg.num_layers
    labels = {(s.launch.program, s.launch.layer) for s in timeline.spans}
    assert labels == ({("attention_first", 0), ("attention_head", layers - 1)}
                      | {("attention_layer", layer) for layer in range(1, layers)}
                      | {("expert_layer", layer) for layer in range(layers)})
    assert all(s.end_us > s.start_us for s in timeline.spans)
    attention = sorted((s for s in timeline.spans if s.launch.group == "attention"), key=lambda s: s.start_us)
    experts = sorted((s for s in timeline.spans if s.launch.group == "experts"), key=lambda s: s.launch.layer)
    for layer, expert in enumerate(experts):  # each layer's experts finish after its attention, before the next's
        assert attention[layer].end_us <= expert.end_us <= attention[layer + 1].end_us
    busy = timeline.busy_fraction()
    assert set(busy) == {"attention", "experts"} and all(0 < f <= 1 for f in busy.values())
    paths = timeline.save(tmp_path, "test")
    events = json.loads(paths["json"].read_text())["traceEvents"]
    assert sum(e["ph"] == "X" for e in events) == 2 * layers + 1
    assert paths["png"].stat().st_size > 0


@pytest.mark.slow
def test_rebalance_mid_run_moves_weights_and_keeps_outputs():
    m = _skewed_model(top_k=2, hot=1)  # expert 1 takes every token: a hot expert worth replicating
    reqs = [(f"r{i}", [3 + i, 9, 2 * i + 1, 7], SamplingParams(max_tokens=8, temperature=0, logprobs=3,
                                                               ignore_eos=True)) for i in range(4)]
    want = _run(Engine(m, EngineConfig(**OPTIONS)), reqs)
    engine = Engine(m, EngineConfig(**OPTIONS), plan=DeploymentPlan(1, 1, 2, 1, 2))
    runner = engine.runner
    before = runner.placement
    got = {}
    for rid, prompt, sp in reqs:
        engine.add_request(rid, prompt, sp)
    for step in range(20):
        if step == 4:  # mid-run: requests are decoding with KV in the cache
            placement = engine.rebalance(redundancy=2)
            assert runner.placement != before
            assert sum(1 in node for node in placement.nodes) == 2  # the hot expert now has a replica per node
            for e, node in enumerate(placement.nodes):
                assert all(state["w_gate_up"].shape[1] == len(node) for state in runner.node("expert", e).layers)
            runner.record_traffic()
        if step == 5:  # the hot expert's tokens went to both of its replicas
            rec = runner.traffic[0]
            assert all(int(c) > 0 for c in rec["counts"])
            ids, valid = np.asarray(rec["topk_ids"]), np.asarray(rec["valid"])
            hot = {t * 2 + j for t in np.flatnonzero(valid) for j in range(2) if ids[t, j] == 1}
            served = [hot & set(np.asarray(o).tolist()) for o in rec["orders"]]
            assert all(served) and set.union(*served) == hot
            runner.record_traffic(False)
        for d in engine.step():
            tokens, lps = got.setdefault(d.request_id, ([], []))
            tokens += d.token_ids
            lps += d.logprobs or []
    assert not engine.has_unfinished()
    assert_same_outputs(got, want)


@pytest.mark.slow
def test_profiler_measures_the_nodes_programs():
    from msjax.planner.profile import parse_profile
    from msjax.planner.profiler import fit, measure_layer_times, profile_toml, with_layers
    import tomllib
    m = MoEModel.random(tiny_config(max_position_embeddings=128), seed=0)
    measured = measure_layer_times(m, [2, 4], context=20, repeats=2)
    assert measured["batch"] == [2, 4]
    assert all(t > 0 for t in measured["expert_s"]) and len(measured["attention_s"]) == 2
    # layer differencing runs the model's own layers, cyclically: layer i is layer i mod L
    deep = with_layers(m, 5)
    np.testing.assert_array_equal(np.asarray(deep.expert_state["w_down"][...])[3],
                                  np.asarray(m.expert_state["w_down"][...])[0])
    assert deep.attention_state["embed"][...] is m.attention_state["embed"][...]
    # the file format round-trips through the planner's parser (timings here are too noisy to fit: use a line)
    line = {"batch": [2, 4, 8], "attention_s": [1e-3, 1.5e-3, 2.5e-3], "expert_s": [2e-3, 2.2e-3, 2.6e-3]}
    t_a, t_e = fit(line)[:2]
    assert t_a.source == t_e.source == "measured"
    profile = parse_profile(tomllib.loads(profile_toml(line, gpu="H100")))
    assert profile.cost("attention", "H100", 1).slope == pytest.approx(t_a.slope, rel=1e-3)
    assert profile.cost("expert", "H100", 1).intercept == pytest.approx(t_e.intercept, rel=1e-3)


@pytest.mark.slow
def test_step_variants_take_turns_and_host_time_comes_from_the_trace():
    from msjax.planner.profiler import time_decode_step_variants, traced_host_seconds
    engine = Engine(model("mixtral"), EngineConfig(**OPTIONS), plan=DeploymentPlan(1, 1, 1, 1, 1))
    counts = []  # micro-batches of each step the runner ran
    run = engine.runner.step
    engine.runner.step = lambda batches: (counts.append(len(batches[0])), run(batches))[1]
    variants = {m: (lambda m=m: setattr(engine, "micro_batches", m)) for m in (1, 2)}
    host = {}
    times = time_decode_step_variants(engine, 4, 6, 2, variants, warm_decode_steps=1,
                                      after=lambda: host.update(traced_host_seconds(engine, variants, rounds=1)),
                                      spare_steps=4)
    # warm-up 1 then 2, timed steps in turn, then the traced round
    assert counts[-8:] == [1, 2, 1, 2, 1, 2, 1, 2]
    assert set(times) == set(host) == {1, 2}
    for m in (1, 2):  # the host share of a step: positive, and less than the whole step
        assert 0 < host[m] < times[m] * 1.5, (host, times)
    engine.close()
