"""Surviving the loss of an expert node: expert node processes killed mid-decode (mid-step, between steps, one
after another, all of them); every request finishes with exactly the tokens of a run without the fault, with and
without replicas of the lost node's experts; losing the last expert node is a clear error within seconds.
Device-free parts first: where the lost node's experts go (`msjax.runtime.faults.degrade`)."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from msjax import SamplingParams
from msjax.comm import native
from msjax.config import DeploymentPlan, EngineConfig, check_placement
from msjax.engine.engine import Engine
from msjax.errors import ConfigError
from msjax.models.programs import MoEModel
from msjax.runtime import protocol as p
from msjax.runtime.faults import degrade, rebuilt_experts
from tests.model_utils import assert_same_outputs, run_requests, run_segments, tiny_config

OPTIONS = dict(page_size=8, num_pages=48, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=96)
NO_REPLICAS = ((0, 1), (2, 3), (4,))  # tiny_config: 5 experts on 3 expert nodes
REPLICAS = ((0, 1, 2, 4), (2, 3, 0), (4, 1, 3))  # every expert on two nodes
_CACHE: dict = {}
needs_native = pytest.mark.skipif(not native.is_built(), reason="native M2N library not built")


# -- where the experts go (no devices) ------------------------------------------------------------------------

def test_a_lost_node_with_replicas_elsewhere_only_re_routes():
    d = degrade(REPLICAS, None, {1}, 5)
    assert d.placement == ((0, 1, 2, 4), (), (4, 1, 3)) and d.loads == {} and d.shares is None
    assert rebuilt_experts(REPLICAS, d) == ()


def test_a_lost_nodes_unreplicated_experts_go_to_the_least_loaded_live_nodes():
    d = degrade(NO_REPLICAS, None, {0}, 5)
    assert d.placement == ((), (2, 3, 1), (4, 0)) and d.loads == {1: (2, 3, 1), 2: (4, 0)}
    assert rebuilt_experts(NO_REPLICAS, d) == (0, 1)
    again = degrade(d.placement, None, {0, 2}, 5)  # a second loss, nodes already lost stay empty
    assert again.placement == ((), (2, 3, 1, 0, 4), ()) and rebuilt_experts(d.placement, again) == (0, 4)


def test_kept_replicas_keep_their_shares_and_a_rebuilt_expert_serves_all_of_its_tokens():
    placement, shares = ((0, 1), (2, 0), (3, 4)), ((0.5, 1.0), (1.0, 0.5), (1.0, 1.0))
    d = degrade(placement, shares, {0}, 5)  # expert 0 keeps its replica on node 1, expert 1 is rebuilt there
    assert d.placement == ((), (2, 0, 1), (3, 4)) and d.shares == ((), (1.0, 0.5, 1.0), (1.0, 1.0))


def test_losing_every_expert_node_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"every expert node is lost \(0, 1, 2\)"):
        degrade(((), (0, 1, 2, 3, 4), ()), None, {1, 0, 2}, 5)


def test_a_re_placement_may_not_use_a_lost_node():
    check_placement(((), (0, 1, 2), (3, 4)), 5, 3, lost={0})
    with pytest.raises(ConfigError, match=r"expert nodes \[0\], which are lost"):
        check_placement(((0,), (1, 2), (3, 4)), 5, 3, lost={0})
    with pytest.raises(ConfigError, match="at least one expert"):
        check_placement(((), (0, 1, 2, 3, 4), ()), 5, 3, lost={0})


# -- real node processes ----------------------------------------------------------------------------------------

def _model() -> MoEModel:
    if "model" not in _CACHE:
        _CACHE["model"] = MoEModel.random(tiny_config(), seed=0)
    return _CACHE["model"]


def _requests(n: int = 8, max_tokens: int = 10):
    rng = np.random.default_rng(3)
    return [(f"r{i}", rng.integers(0, 61, size=int(rng.integers(3, 12))).tolist(),
             SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=2, ignore_eos=True)) for i in range(n)]


def _reference():
    if "ref" not in _CACHE:
        _CACHE["ref"] = run_requests(Engine(_model(), EngineConfig(**OPTIONS)), _requests())
    return _CACHE["ref"]


def _kill(runner, node: int) -> None:
    proc = runner.processes.procs["expert", node]
    os.kill(proc.pid, signal.SIGKILL)
    proc.proc.wait(10)


def _kill_mid_step(runner, at_steps: dict[int, list[int]]):
    """Kill expert node processes right after the runner handed step k its requests (before any of the step's
    programs ran here): `at_steps` {engine step k: [nodes]}. Returns the list of steps it killed in."""
    submit, count, killed = runner._submit, [0], []

    def wrapped(node_key, request):
        submit(node_key, request)
        if isinstance(request, p.AttentionStep):
            count[0] += 1
            for node in at_steps.get(count[0], ()):
                if runner.processes.procs["expert", node].alive():
                    _kill(runner, node)
                    killed.append(count[0])
    runner._submit = wrapped
    return killed


def _run(plan, *, kill_mid_step=None, kill_before_step=None, before_step=None):
    """8 greedy requests under `plan` with expert processes killed as asked (and `before_step(runner, step)`
    called before each engine step): (outputs, runner fault stats, placement at the end, health at the end,
    pages free at the end == all, the steps it killed in)."""
    before = run_segments()
    engine = Engine(_model(), EngineConfig(**OPTIONS), plan=plan)
    runner = engine.runner
    try:
        killed = _kill_mid_step(runner, kill_mid_step or {})

        def hook(step):
            for node in (kill_before_step or {}).get(step, ()):
                _kill(runner, node)
            if before_step is not None:
                before_step(runner, step)
        got = run_requests(engine, _requests(), before_step=hook)
        result = (got, runner.faults.snapshot(), runner.placement, runner.health(),
                  engine.num_free_pages() == engine.num_total_pages(), killed)
    finally:
        engine.close()
    assert run_segments() <= before
    return result


@needs_native
def test_an_expert_node_killed_mid_step_with_replicas_changes_no_token():
    """3 expert processes, every expert on two of them; node 1 killed in the middle of decode step 3: the step
    is run again on the replicas (no expert loads), and every request ends with the tokens of a run without the
    fault; health says degraded, not unhealthy."""
    plan = DeploymentPlan(1, 1, 3, 1, 2, transport="shm", placement=REPLICAS)
    got, faults, placement, health, pages_free, killed = _run(plan, kill_mid_step={3: [1]})
    assert killed == [3]
    assert_same_outputs(got, _reference())
    assert faults["faults"] == 1 and faults["rerun_steps"] == 1 and faults["rebuilds"] == 0
    assert faults["degraded_steps"] > 0 and faults["degraded_tokens"] > 0
    assert placement == ((0, 1, 2, 4), (), (4, 1, 3))
    assert health.healthy and "expert nodes [1] lost" in health.degraded and health.lost == (1,)
    assert pages_free


@pytest.mark.slow
@needs_native
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_an_expert_node_killed_mid_step_without_replicas_is_rebuilt_and_changes_no_token(transport):
    """No replicas: the lost node's experts are loaded onto the live nodes before the step runs again."""
    plan = DeploymentPlan(1, 1, 3, 1, 2, transport=transport, placement=NO_REPLICAS)
    got, faults, placement, health, pages_free, killed = _run(plan, kill_mid_step={2: [0]})
    assert killed == [2]
    assert_same_outputs(got, _reference())
    assert faults["faults"] == 1 and faults["rerun_steps"] == 1 and faults["rebuilds"] == 1
    assert placement == ((), (2, 3, 1), (4, 0)) and health.healthy and health.lost == (0,)
    assert pages_free


@pytest.mark.slow
@needs_native
def test_two_expert_nodes_lost_one_after_the_other_change_no_token():
    """Node 2 dies between steps (found before the next one, no step re-run), then node 0 mid-step: decode goes
    on on the one node left, which ends up holding every expert."""
    plan = DeploymentPlan(1, 1, 3, 1, 1, transport="shm", placement=NO_REPLICAS)
    got, faults, placement, health, pages_free, killed = _run(plan, kill_before_step={2: [2]},
                                                              kill_mid_step={5: [0]})
    assert killed == [5]
    assert_same_outputs(got, _reference())
    assert faults["faults"] == 2 and faults["rerun_steps"] == 1 and faults["rebuilds"] == 2
    assert sorted(placement[1]) == [0, 1, 2, 3, 4] and placement[0] == placement[2] == ()
    assert health.healthy and health.lost == (0, 2)


@pytest.mark.slow
@needs_native
def test_a_rejoined_expert_node_takes_its_experts_back_and_survives_a_second_loss():
    """Node 1 killed mid-step (its experts rebuilt on the others), started again two steps later (a new process,
    every node's channels on the next generation), serving its experts again, then killed mid-step again: every
    request ends with the tokens of a run without any fault."""
    pongs = []

    def before_step(runner, step):
        if step == 4:
            with pytest.raises(ConfigError, match="expert node 0 is not lost"):
                runner.rejoin(0)
            runner.rejoin(1)
            assert runner.placement[1] == NO_REPLICAS[1] and runner.lost == set()
            assert runner.health().degraded == "" and runner.topology.generation == 1
        if step == 5:  # (before the second kill: AttentionStep 7, counting step 1's re-run)
            runner.links.submit(("expert", 1), p.Ping())
            pongs.append(runner.links.reply(("expert", 1)))
    plan = DeploymentPlan(1, 1, 3, 1, 2, transport="shm", placement=NO_REPLICAS)
    got, faults, placement, health, pages_free, killed = _run(plan, kill_mid_step={2: [1], 7: [1]},
                                                              before_step=before_step)
    assert killed == [2, 7]
    assert_same_outputs(got, _reference())
    assert pongs and pongs[0].steps == 1 and pongs[0].experts == NO_REPLICAS[1]  # it served step 4
    assert faults["faults"] == 2 and faults["rejoins"] == 1 and faults["rerun_steps"] == 2
    assert health.lost == (1,) and pages_free


@pytest.mark.slow
@needs_native
def test_a_plan_that_restarts_lost_experts_brings_the_node_back_by_itself():
    """restart_lost_experts: node 0 killed mid-step 2 is started again at once; decode goes on without it while
    it loads, and the first step after it is ready brings it back (no call from the engine)."""
    seen = {}

    def before_step(runner, step):
        if step == 2:
            assert runner.restarting == [0] and runner.lost == {0}
            from tests.serving_utils import poll
            poll(lambda: runner.rejoin_ready(0), timeout=60, interval=0.05, what="the restarted node loaded")
        if step == 3:  # step 2 (after the poll) took it in
            seen.update(lost=set(runner.lost), restarting=runner.restarting, placement=runner.placement)
    plan = DeploymentPlan(1, 1, 3, 1, 2, transport="shm", placement=NO_REPLICAS, restart_lost_experts=True)
    got, faults, placement, health, pages_free, killed = _run(plan, kill_mid_step={2: [0]}, before_step=before_step)
    assert killed == [2]
    assert_same_outputs(got, _reference())
    assert seen == {"lost": set(), "restarting": [], "placement": ((0, 1), (2, 3, 1), (4, 0))}
    assert faults["faults"] == 1 and faults["rejoins"] == 1 and health.lost == () and health.degraded == ""
    assert pages_free


@pytest.mark.slow
@needs_native
def test_losing_every_expert_node_fails_clearly_within_seconds():
    """Every expert process killed mid-step: the step fails within 5 s with an error naming the loss, the
    deployment closes, health says why; nothing hangs and nothing is left behind."""
    from msjax.runtime.hosts import WorkerError
    before = run_segments()
    plan = DeploymentPlan(1, 1, 3, 1, 1, transport="shm", placement=REPLICAS)
    engine = Engine(_model(), EngineConfig(**OPTIONS), plan=plan)
    runner = engine.runner
    try:
        for rid, prompt, sp in _requests(2):
            engine.add_request(rid, prompt, sp)
        engine.step()
        _kill_mid_step(runner, {1: [0, 1, 2]})  # the next step
        start = time.monotonic()
        with pytest.raises(WorkerError, match="every expert node is lost"):
            engine.step()
        assert time.monotonic() - start < 5
        assert runner.closed and not runner.health().healthy
    finally:
        engine.close()
    assert run_segments() <= before


@pytest.mark.slow
@needs_native
def test_the_server_keeps_serving_through_an_expert_nodes_loss_and_says_so():
    """`msjax.serve` over 3 expert processes, 8 concurrent greedy HTTP completions, one expert process killed
    mid-decode: every completion is the single-process engine's text; /health says degraded and /metrics counts
    the fault. Then the other two are killed: a new request fails with a clear error within 5 s, the server
    stays up and /health answers 503 not ready (gRPC health NOT_SERVING)."""
    import concurrent.futures

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    import msjax
    from serving.metrics import parse
    from tests.serving_utils import http, poll
    options = dict(max_num_seqs=8, num_pages=96, page_size=16, max_num_batched_tokens=128, max_model_len=128)
    prompts = ["Beautiful is better than", "Explicit is", "Simple is better", "Flat is better than nested",
               "Sparse is", "Readability counts", "Special cases", "Errors should never"]
    sampling = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    llm = msjax.LLM("tiny-moe", **options)  # one process, one program
    want = [o.text for o in llm.generate(prompts, sampling)]
    del llm
    before = run_segments()
    srv = msjax.serve(msjax.ServeConfig(plan=DeploymentPlan(1, 1, 3, 1, 2, transport="shm"), grpc_port=0,
                                        http_port=0, engine=options, warmup=False))
    runner = srv.engine.runner
    try:
        def complete(prompt):
            return http("POST", srv.http_address + "/v1/completions",
                        {"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}, timeout=120)

        def metrics():
            return parse(http("GET", srv.http_address + "/metrics")[1])
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(complete, prompt) for prompt in prompts]
            steps = metrics()["msjax_engine_steps_total"]
            poll(lambda: metrics()["msjax_engine_steps_total"] >= steps + 4, what="decode steps")
            _kill(runner, 1)
            got = [f.result() for f in futures]
        assert [status for status, _ in got] == [200] * len(prompts), got
        assert [body["choices"][0]["text"] for _, body in got] == want
        status, body = http("GET", srv.http_address + "/health")
        assert status == 200 and body["status"] == "degraded" and "expert nodes [1] lost" in body["detail"]
        m = metrics()
        assert m["msjax_expert_node_faults_total"] == 1 and m["msjax_degraded_steps_total"] > 0

        _kill(runner, 0)
        _kill(runner, 2)
        start = time.monotonic()
        status, body = complete("Now is better than never")
        assert status == 500 and "every expert node is lost" in body["error"]["message"], body
        assert time.monotonic() - start < 5
        status, body = http("GET", srv.http_address + "/health")
        assert status == 503 and body["status"] == "not ready", body
        with grpc.insecure_channel(srv.grpc_address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            poll(lambda: stub.Check(health_pb2.HealthCheckRequest()).status
                 == health_pb2.HealthCheckResponse.NOT_SERVING, what="gRPC health NOT_SERVING")
    finally:
        srv.stop()
    assert run_segments() <= before
