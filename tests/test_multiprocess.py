"""Multi-process deployment on one host: expert nodes as separate processes, packets through the native M2N
library's custom calls inside the jitted programs (shm and tcp); greedy outputs identical to the single-process
run, clear errors when a worker fails to start or dies, nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from msjax import SamplingParams
from msjax.comm import native
from msjax.config import DeploymentPlan, EngineConfig
from msjax.engine.engine import Engine
from msjax.errors import ConfigError
from msjax.models.programs import MoEModel
from tests.model_utils import assert_same_outputs, run_requests, tiny_config

# hard limits: every M2N wait times out (60 s), start-up gives up after 120 s, subprocesses are waited with a timeout
pytestmark = pytest.mark.skipif(not native.is_built(), reason="native M2N library not built")

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = dict(page_size=8, num_pages=24, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=96)
_CACHE: dict = {}


def _model() -> MoEModel:
    if "model" not in _CACHE:
        _CACHE["model"] = MoEModel.random(tiny_config(), seed=0)
    return _CACHE["model"]


def _requests():
    rng = np.random.default_rng(1)
    return [(f"r{i}", rng.integers(0, 61, size=n).tolist(),
             SamplingParams(max_tokens=3, temperature=0.0, logprobs=2, ignore_eos=True))
            for i, n in enumerate([3, 9, 12])]  # few shapes: compiles dominate on a CPU


def _reference():
    if "ref" not in _CACHE:
        _CACHE["ref"] = run_requests(Engine(_model(), EngineConfig(**OPTIONS)), _requests())
    return _CACHE["ref"]


def _segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("msjax-m2n-mp*")}


def _schedule(compiled_hlo: str) -> list[str]:
    """The order XLA scheduled the step program's main computation in, as a list of: route (a micro-batch's
    router top-k, inside its attention), send / recv (m2n calls, a run of them to every expert node counted
    once) and head (a micro-batch's LM head)."""
    entry = compiled_hlo[compiled_hlo.index("\nENTRY "):]
    kinds = []
    for line in entry.splitlines():
        kind = ("send" if 'custom_call_target="m2n_send"' in line else
                "recv" if 'custom_call_target="m2n_recv_all"' in line else
                "route" if "router/top_k" in line and "custom-call(" in line else
                "head" if "jit(head_step)/dot_general" in line else None)
        if kind and (not kinds or kinds[-1] != kind):
            kinds.append(kind)
    return kinds


def _ping_pong(m: int, layers: int) -> list[str]:
    """Paper §4.1's order on an attention node: each micro-batch's attention and send in turn (so the experts
    start on micro-batch 0 while micro-batch 1 is in attention), in later layers after that micro-batch's
    receive; at the end each micro-batch's head right after its last receive (while the experts finish the next)."""
    return (["route", "send"] * m + ["recv", "route", "send"] * (m * (layers - 1)) + ["recv", "head"] * m)


def _check_generation(plan: DeploymentPlan, *, check_hlo: bool = False):
    want = _reference()
    before = _segments()
    engine = Engine(_model(), EngineConfig(**OPTIONS), plan=plan)
    runner = engine.runner
    procs = list(runner.procs) + list(runner.attention_procs)
    seen = []
    try:
        assert type(runner).__name__ == "MultiProcessRunner"
        assert len(runner.procs) == plan.expert_nodes and all(p.poll() is None for p in procs)
        assert len(runner.attention_procs) == (plan.attention_nodes if plan.attention_processes else 0)
        assert len(runner.nodes) == (0 if plan.attention_processes else plan.attention_nodes)
        for node in runner.nodes:  # tensor parallelism inside the node: its KV heads over its devices
            assert len(node.kv.k.sharding.device_set) == plan.attention_tp
        run = runner.run
        runner.run = lambda batches: (seen.append(batches), run(batches))[1]
        got = run_requests(engine, _requests())
        assert_same_outputs(got, want)
        assert engine.num_free_pages() == engine.num_total_pages()
        # every valid row routed to top_k experts in every layer, counted on whichever node ran it, read once
        rows = sum(int((b.positions >= 0).sum()) for step in seen for node in step for b in node)
        cfg = tiny_config()
        assert runner.read_expert_load().sum() == cfg.num_layers * cfg.top_k * rows
        assert runner.read_expert_load().sum() == 0
        if plan.attention_nodes > 1:  # both attention nodes had work (the engine spreads requests)
            assert all(any(step[a] for step in seen) for a in range(plan.attention_nodes))
        if not plan.attention_processes:
            signatures = {tuple((b.tokens.shape, b.page_table.shape, b.decode, b.num_logprobs) for b in step[0])
                          for step in seen}  # node 0
            assert runner._step_program(0)._cache_size() == len(signatures)  # one compile per step signature
        if check_hlo:  # the data path is inside the program: the attention side holds both custom calls
            text = runner.lower_attention(seen[0][0])
            assert "m2n_send" in text and "m2n_recv_all" in text
            step = max(seen, key=lambda s: len(s[0]))[0]  # a step with the most micro-batches
            scheduled = _schedule(runner.lower_attention(step, compiled=True))
            assert scheduled == _ping_pong(len(step), tiny_config().num_layers), scheduled
    finally:
        engine.close()
    assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]  # stopped cleanly
    assert _segments() <= before


def test_step_inputs_pack_into_two_arrays_and_back():
    from msjax.engine.batch import StepBatch
    from msjax.runtime.multiprocess import pack_step_inputs, unpack_step_inputs
    rng = np.random.default_rng(0)
    ints = lambda *shape: rng.integers(-5, 1000, size=shape).astype(np.int32)  # noqa: E731
    b = StepBatch(True, 0, ints(6), ints(6), ints(6), ints(4, 3), ints(4), rng.random(4, np.float32),
                  rng.random(4, np.float32), ints(4), rng.integers(0, 2**32, size=4, dtype=np.uint32), ints(4))
    packed_ints, packed_floats, layout = pack_step_inputs(b)
    assert packed_ints.dtype == np.int32 and packed_floats.dtype == np.float32 and layout == (6, 4, 3)
    tokens, batch, logit_rows, temperature, top_p, top_k, seeds, steps = unpack_step_inputs(
        jnp.asarray(packed_ints), jnp.asarray(packed_floats), layout)
    for got, want in [(tokens, b.tokens), (batch.positions, b.positions), (batch.seq_ids, b.seq_ids),
                      (batch.page_table, b.page_table), (logit_rows, b.logit_rows), (temperature, b.temperature),
                      (top_p, b.top_p), (top_k, b.top_k), (seeds, b.seeds), (steps, b.steps)]:
        assert got.dtype == want.dtype and np.array_equal(np.asarray(got), want)


def test_shm_one_expert_node_one_micro_batch():
    _check_generation(DeploymentPlan(1, 1, 1, 1, 1, transport="shm"), check_hlo=True)


def test_tcp_two_expert_nodes_two_micro_batches():
    _check_generation(DeploymentPlan(1, 1, 2, 1, 2, transport="tcp"), check_hlo=True)


def test_tensor_parallel_nodes_shm():
    """tp = 3 inside both nodes (the attention node here on three of the engine's devices, the expert node a
    process with three): each node's program runs SPMD over its devices and sends one message per packet."""
    _check_generation(DeploymentPlan(1, 3, 1, 3, 2, transport="shm"))


def test_attention_nodes_as_processes_shm():
    """Every node a process (two attention, two expert): the engine's process only schedules."""
    _check_generation(DeploymentPlan(2, 1, 2, 1, 2, transport="shm", attention_processes=True))


@pytest.mark.slow
@pytest.mark.parametrize("plan", [DeploymentPlan(1, 1, 2, 1, 2, transport="shm"),
                                  DeploymentPlan(1, 1, 1, 1, 1, transport="tcp"),
                                  DeploymentPlan(2, 1, 2, 1, 2, transport="shm"),
                                  DeploymentPlan(2, 1, 3, 1, 1, transport="tcp"),
                                  DeploymentPlan(2, 1, 3, 1, 2, transport="tcp", attention_processes=True),
                                  DeploymentPlan(1, 1, 2, 1, 3, transport="shm", attention_processes=True),
                                  DeploymentPlan(2, 3, 2, 3, 2, transport="tcp", attention_processes=True)],
                         ids=["shm-1-2-2", "tcp-1-1-1", "shm-2a-2-2", "tcp-2a-3-1", "tcp-2ap-3-2", "shm-1ap-2-3",
                              "tcp-2ap-tp3-2-tp3"])
def test_more_plans(plan):
    _check_generation(plan)


@pytest.mark.slow
@pytest.mark.parametrize("attention_processes", [False, True], ids=["attention-here", "attention-processes"])
def test_rebalance_between_steps_moves_experts_across_processes(monkeypatch, attention_processes):
    from msjax.runtime import multiprocess as mp
    engine = Engine(_model(), EngineConfig(**OPTIONS), plan=DeploymentPlan(
        1, 1, 2, 1, 2, transport="shm", attention_processes=attention_processes))
    runner = engine.runner
    procs, old = list(runner.procs) + list(runner.attention_procs), runner.placement
    new = ((3, 4, 0), (0, 1, 2))  # both nodes change; expert 0 gets a replica on each
    assert old != new
    real = mp.expert_subset
    calls = []

    def before_step(step):
        calls.append(step)
        if step == 1:  # after the prefill: every request has KV in the cache
            # node 0 cannot load (weights of the wrong structure): node 1, which could, goes back, and the
            # runner keeps its placement
            monkeypatch.setattr(mp, "expert_subset", lambda model, experts: (
                (None, {"w": np.zeros(1)}) if experts == new[0] else real(model, experts)))
            with pytest.raises(ConfigError, match="expert node 0 cannot load"):
                runner.set_placement(new)
            monkeypatch.setattr(mp, "expert_subset", real)
            assert runner.placement == old
            runner.set_placement(new)
            assert runner.placement == new
        if step == 2:
            placement = engine.rebalance(redundancy=1)
            assert runner.placement == placement.nodes
    try:
        got = run_requests(engine, _requests(), before_step=before_step)
        assert 2 in calls
        assert_same_outputs(got, _reference())
        assert engine.num_free_pages() == engine.num_total_pages()
    finally:
        engine.close()
    assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]


@pytest.mark.slow
def test_worker_that_fails_to_start_is_a_clear_error():
    from msjax.runtime.multiprocess import MultiProcessRunner, WorkerError
    before = _segments()
    start = time.monotonic()
    with pytest.raises(WorkerError, match="expert node 0 .* exited with code 1"):
        MultiProcessRunner(_model(), EngineConfig(**OPTIONS), DeploymentPlan(1, 1, 1, 1, 1, transport="shm"),
                           checkpoint="/nonexistent/checkpoint", startup_timeout_s=60)
    assert time.monotonic() - start < 30
    assert _segments() <= before


@pytest.mark.parametrize("transport,attention_processes,victim", [
    ("shm", False, "expert"),
    pytest.param("tcp", False, "expert", marks=pytest.mark.slow),
    pytest.param("shm", True, "expert", marks=pytest.mark.slow),
    pytest.param("shm", True, "attention", marks=pytest.mark.slow)])  # quick subset budget: 5 min
def test_worker_death_mid_step_is_a_clear_error(transport, attention_processes, victim):
    """A node process killed before a step: the step fails within seconds with an error naming that node, and
    every other process stops. With the engine's own liveness check off, the exchange itself notices: an expert
    node's death through the M2N library (its attention peer reports it), an attention node's through the
    control channel."""
    from msjax.runtime.multiprocess import MultiProcessRunner, WorkerError
    before = _segments()
    plan = DeploymentPlan(2 if victim == "attention" else 1, 1, 2, 1, 1, transport=transport,
                          attention_processes=attention_processes)
    runner = MultiProcessRunner(_model(), EngineConfig(**OPTIONS), plan, timeout_s=60)
    try:
        engine = Engine(_model(), EngineConfig(**OPTIONS), plan=runner.plan, runner=runner)
        for i in range(plan.attention_nodes):  # work for every attention node
            engine.add_request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0))
        procs = runner.procs if victim == "expert" else runner.attention_procs
        os.kill(procs[1].pid, signal.SIGKILL)  # node 0 lives on; the engine must name node 1
        procs[1].wait(10)
        runner._check_workers = lambda when: None  # let the step start: the exchange itself must notice
        start = time.monotonic()
        with pytest.raises(WorkerError, match=f"{victim} node 1 .*exited"):
            engine.step()
        assert time.monotonic() - start < 20  # not the 60 s exchange timeout
        assert runner.closed
    finally:
        runner.close()
    assert all(p.poll() is not None for p in runner.procs + runner.attention_procs)
    assert _segments() <= before


@pytest.mark.slow
def test_attention_process_death_between_steps_closes_the_deployment():
    """An attention process dies between steps and the engine asks the nodes for their expert load: the read
    fails within seconds naming the node (the engine's liveness check while it waits for the reply), and every
    other process stops; the runner refuses further use."""
    from msjax.runtime.multiprocess import MultiProcessRunner, WorkerError
    before = _segments()
    plan = DeploymentPlan(2, 1, 1, 1, 1, transport="shm", attention_processes=True)
    runner = MultiProcessRunner(_model(), EngineConfig(**OPTIONS), plan, timeout_s=60)
    try:
        victim = runner.attention_procs[1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        start = time.monotonic()
        with pytest.raises(WorkerError, match="attention node 1 .*exited.*-9"):
            runner.read_expert_load()
        assert time.monotonic() - start < 20 and runner.closed
        with pytest.raises(WorkerError, match="closed"):
            runner.read_expert_load()
    finally:
        runner.close()
    assert all(p.poll() is not None for p in runner.procs + runner.attention_procs)
    assert _segments() <= before


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packet_bytes_roundtrip(dtype):
    import jax.numpy as jnp

    from msjax.runtime.multiprocess import pack_rows, row_bytes, unpack_rows
    rows = jnp.asarray(np.random.default_rng(0).normal(size=(6, 5)), dtype)
    ids = jnp.array([0, 3, 1, 7, 2, 2], jnp.int32)
    buf = pack_rows(rows, ids)
    assert buf.dtype == jnp.uint8 and buf.shape == (6, row_bytes(5, dtype))
    back, back_ids = unpack_rows(buf, 5, dtype)
    assert back.dtype == rows.dtype and bool((back == rows).all()) and bool((back_ids == ids).all())


def test_plan_transport_errors():
    from msjax.runtime.disaggregated import DisaggregatedRunner
    with pytest.raises(ConfigError, match="separate processes"):
        DisaggregatedRunner(_model(), EngineConfig(**OPTIONS), DeploymentPlan(1, 1, 1, 1, 1, transport="shm"))
    from msjax.runtime.multiprocess import MultiProcessRunner
    import jax
    with pytest.raises(ConfigError, match="needs 6 devices for attention here, 2 exist"):
        MultiProcessRunner(_model(), EngineConfig(**OPTIONS), DeploymentPlan(2, 3, 1, 1, 1, transport="shm"),
                           devices=jax.devices()[:2])
    with pytest.raises(ConfigError, match="attention_processes: 2 attention nodes with attention_tp = 3 cannot "
                                          "share one process on CPU"):
        MultiProcessRunner(_model(), EngineConfig(**OPTIONS), DeploymentPlan(2, 3, 1, 1, 1, transport="shm"))
    with pytest.raises(ConfigError, match="expert_tp: 5 does not divide"):
        MultiProcessRunner(_model(), EngineConfig(**OPTIONS), DeploymentPlan(1, 1, 1, 5, 1, transport="shm"))
    for plan in (DeploymentPlan(1, 1, 1, 1, 1, attention_processes=True),
                 DeploymentPlan(colocated_devices=1, transport="shm", attention_processes=True)):
        with pytest.raises(ConfigError, match="attention_processes.*transport 'shm' or 'tcp'"):
            Engine(_model(), EngineConfig(**OPTIONS), plan=plan)


def test_plan_attention_processes_round_trips_through_toml():
    plan = DeploymentPlan(2, 1, 2, 1, 2, transport="tcp", attention_processes=True)
    assert "attention_processes = true" in plan.to_toml()
    assert DeploymentPlan.from_toml(plan.to_toml()) == plan
    with pytest.raises(ConfigError, match="attention_processes: must be true or false"):
        DeploymentPlan.from_toml('[plan]\nattention_processes = "yes"\n')


@pytest.mark.parametrize("max_model_len,max_num_seqs,micro_batches", [(96, 4, 1), (96, 4, 3), (None, 256, 2)])
def test_control_channel_holds_the_largest_step_and_reply(max_model_len, max_num_seqs, micro_batches):
    """The control channel to an attention process is sized from the engine's limits: the largest command
    (m prefill micro-batches of the most tokens and sequences, logprobs on) and reply fit, with the routing
    table of a replicated placement."""
    import pickle

    from msjax.comm.m2n import Routing
    from msjax.engine.batch import StepBatch
    from msjax.engine.sampling_params import MAX_LOGPROBS
    from msjax.runtime.multiprocess import control_bytes, node_inputs
    from msjax.runtime.sampler import Sampled
    cfg = tiny_config()
    ec = EngineConfig(**{**OPTIONS, "max_model_len": max_model_len, "num_pages": 1024, "max_num_seqs": max_num_seqs,
                         "max_num_batched_tokens": 16 * max_num_seqs})
    plan = DeploymentPlan(1, 1, 2, 1, micro_batches, transport="shm", attention_processes=True)
    ctl, res = control_bytes(cfg, ec, plan)
    t, s = ec.max_num_batched_tokens, ec.max_num_seqs
    pages = -(-ec.resolved_max_model_len(cfg) // ec.page_size)
    i32 = lambda *shape: np.full(shape, 2**31 - 1, np.int32)  # noqa: E731
    f32 = lambda *shape: np.full(shape, 0.5, np.float32)  # noqa: E731
    big = StepBatch(False, MAX_LOGPROBS, i32(t), i32(t), i32(t), i32(s, pages), i32(s), f32(s), f32(s), i32(s),
                    np.full(s, 2**32 - 1, np.uint32), i32(s))
    every = tuple(range(cfg.num_experts))
    routing = Routing.from_placement((every, every), cfg.num_experts)  # every expert on both nodes
    rounds = [[[0, t * cfg.top_k]] for _ in range(micro_batches)]
    command = {"control": [(e, str({"rounds": rounds}).encode()) for e in range(2)],
               "step": node_inputs([big] * micro_batches), "routing": routing}
    assert len(pickle.dumps(command)) <= ctl
    reply = {"sampled": [Sampled(i32(s), f32(s), i32(s, MAX_LOGPROBS), f32(s, MAX_LOGPROBS))
                         for _ in range(micro_batches)]}  # distinct objects: pickle writes a repeated one once
    assert len(pickle.dumps(reply)) <= res
    assert ctl < 2 * len(pickle.dumps(command)) + (1 << 16)  # sized from the limits, not an arbitrary ceiling


@pytest.mark.slow
def test_launch_generates_like_the_single_process_engine(tmp_path):
    """Every node a process (--attention-processes), the weights read from the checkpoint by each node."""
    plan = tmp_path / "plan.toml"
    DeploymentPlan(2, 1, 2, 1, 2, transport="tcp").save(plan)
    out = subprocess.run([sys.executable, "-m", "msjax.launch", "--plan", str(plan), "--model", "tiny-moe",
                          "--prompt-ids", "1,2,3,4", "--prompt-ids", "5,6", "--max-tokens", "5", "--json",
                          "--attention-processes"], capture_output=True, text=True, timeout=240, cwd=ROOT,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 attention process(es), 2 expert process(es) over tcp" in out.stderr
    import json

    from msjax.models import load
    got = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    model = load("tiny-moe")
    engine = Engine(model, EngineConfig(page_size=16, num_pages=64, max_num_seqs=8, max_num_batched_tokens=64))
    want = run_requests(engine, [("r0", [1, 2, 3, 4], SamplingParams(max_tokens=5, temperature=0.0)),
                                 ("r1", [5, 6], SamplingParams(max_tokens=5, temperature=0.0))])
    assert [g["token_ids"] for g in got] == [want["r0"][0], want["r1"][0]]


ENGINE = """
import sys, time
from msjax.config import DeploymentPlan, EngineConfig
from msjax.models.programs import MoEModel
from msjax.runtime.multiprocess import MultiProcessRunner
from tests.model_utils import tiny_config
config = EngineConfig(page_size=8, num_pages=24, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=96)
plan = DeploymentPlan(1, 1, 2, 1, 1, transport=sys.argv[1], attention_processes=sys.argv[2] == "1")
r = MultiProcessRunner(MoEModel.random(tiny_config()), config, plan)
print(" ".join(str(p.pid) for p in r.procs + r.attention_procs), r.channel, flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("transport,attention_processes", [("shm", False), ("tcp", False), ("shm", True)])
def test_workers_exit_and_clean_up_when_the_engine_is_killed(transport, attention_processes):
    engine = subprocess.Popen([sys.executable, "-c", ENGINE, transport, str(int(attention_processes))],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    pids = []
    try:
        line = engine.stdout.readline().split()  # blocks until the workers are up (start-up times out itself)
        assert line, "the engine process did not start its workers"
        pids, channel = [int(p) for p in line[:-1]], line[-1]
        engine.kill()
        engine.wait(10)
        deadline = time.monotonic() + 15
        while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(_gone(p) for p in pids), "node processes outlived the engine"
        time.sleep(0.5)
        assert not list(Path("/dev/shm").glob(f"msjax-m2n-{channel}-*"))
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()
        for p in pids:
            if not _gone(p):
                os.kill(p, signal.SIGKILL)


@pytest.mark.slow
def test_server_over_node_processes_answers_like_the_offline_engine():
    """`msjax.serve` over a plan whose every node is a process (two attention, two expert, shm): HTTP completions
    from two concurrent clients equal the single-process engine's greedy text, the expert-load metric moves (read
    from the attention processes over their control channel), and stopping the server stops every process."""
    import concurrent.futures

    import msjax
    from serving.metrics import parse
    from tests.serving_utils import http, poll
    plan = DeploymentPlan(2, 1, 2, 1, 2, transport="shm", attention_processes=True)
    options = dict(max_num_seqs=4, num_pages=48, page_size=16, max_num_batched_tokens=64, max_model_len=128)
    prompts = ["Beautiful is better than", "Explicit is"]
    llm = msjax.LLM("tiny-moe", **options)  # one process, one program
    want = [o.text for o in llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0))]
    del llm
    before = _segments()
    srv = msjax.serve(msjax.ServeConfig(plan=plan, grpc_port=0, http_port=0, engine=options))
    runner = srv.engine.runner
    procs = runner.procs + runner.attention_procs
    try:
        assert len(procs) == 4 and not runner.nodes  # the server's process holds no attention node

        def complete(prompt):
            return http("POST", srv.http_address + "/v1/completions",
                        {"prompt": prompt, "max_tokens": 12, "temperature": 0}, timeout=120)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            got = list(pool.map(complete, prompts))
        assert [status for status, _ in got] == [200, 200], got
        assert [body["choices"][0]["text"] for _, body in got] == want

        def expert_tokens():
            m = parse(http("GET", srv.http_address + "/metrics")[1])
            return sum(v for k, v in m.items() if k.startswith("msjax_expert_tokens_total"))
        poll(expert_tokens, what="expert load from the attention processes")
    finally:
        srv.stop()
    assert all(p.poll() is not None for p in procs)
    assert _segments() <= before
