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
    procs = list(runner.procs)
    seen = []
    try:
        assert type(runner).__name__ == "MultiProcessRunner"
        assert len(procs) == plan.expert_nodes and all(p.poll() is None for p in procs)
        run = runner.run
        runner.run = lambda batches: (seen.append(batches), run(batches))[1]
        got = run_requests(engine, _requests())
        assert_same_outputs(got, want)
        assert engine.num_free_pages() == engine.num_total_pages()
        assert runner.read_expert_load().sum() > 0
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


@pytest.mark.slow
@pytest.mark.parametrize("plan", [DeploymentPlan(1, 1, 2, 1, 2, transport="shm"),
                                  DeploymentPlan(1, 1, 1, 1, 1, transport="tcp"),
                                  DeploymentPlan(2, 1, 2, 1, 2, transport="shm"),
                                  DeploymentPlan(2, 1, 3, 1, 1, transport="tcp")],
                         ids=["shm-1-2-2", "tcp-1-1-1", "shm-2a-2-2", "tcp-2a-3-1"])
def test_more_plans(plan):
    _check_generation(plan)


@pytest.mark.slow
def test_rebalance_between_steps_moves_experts_across_processes(monkeypatch):
    from msjax.runtime import multiprocess as mp
    engine = Engine(_model(), EngineConfig(**OPTIONS), plan=DeploymentPlan(1, 1, 2, 1, 2, transport="shm"))
    runner = engine.runner
    procs, old = list(runner.procs), runner.placement
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


@pytest.mark.parametrize("transport", ["shm", pytest.param("tcp", marks=pytest.mark.slow)])
def test_worker_death_mid_step_is_a_clear_error(transport):
    from msjax.runtime.multiprocess import MultiProcessRunner, WorkerError
    before = _segments()
    runner = MultiProcessRunner(_model(), EngineConfig(**OPTIONS), DeploymentPlan(1, 1, 2, 1, 1, transport=transport),
                                timeout_s=60)
    try:
        engine = Engine(_model(), EngineConfig(**OPTIONS), plan=runner.plan, runner=runner)
        engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0))
        victim = runner.procs[1]  # node 0 lives on; the engine must name node 1
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        runner._check_workers = lambda when: None  # let the step start: the exchange itself must notice
        start = time.monotonic()
        with pytest.raises(WorkerError, match="expert nodes \\[1\\] exited"):
            engine.step()
        assert time.monotonic() - start < 20  # not the 60 s exchange timeout
        assert runner.closed
    finally:
        runner.close()
    assert all(p.poll() is not None for p in runner.procs)
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
    with pytest.raises(ConfigError, match="tp"):
        MultiProcessRunner(_model(), EngineConfig(**OPTIONS), DeploymentPlan(1, 2, 1, 1, 1, transport="shm"))


@pytest.mark.slow
def test_launch_generates_like_the_single_process_engine(tmp_path):
    plan = tmp_path / "plan.toml"
    DeploymentPlan(1, 1, 2, 1, 2, transport="tcp").save(plan)
    out = subprocess.run([sys.executable, "-m", "msjax.launch", "--plan", str(plan), "--model", "tiny-moe",
                          "--prompt-ids", "1,2,3,4", "--prompt-ids", "5,6", "--max-tokens", "5", "--json"],
                         capture_output=True, text=True, timeout=240, cwd=ROOT,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
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
r = MultiProcessRunner(MoEModel.random(tiny_config()), EngineConfig(page_size=8, num_pages=24, max_num_seqs=4,
                       max_num_batched_tokens=32), DeploymentPlan(1, 1, 2, 1, 1, transport=sys.argv[1]))
print(" ".join(str(p.pid) for p in r.procs), r.channel, flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_workers_exit_and_clean_up_when_the_engine_is_killed(transport):
    engine = subprocess.Popen([sys.executable, "-c", ENGINE, transport], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
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
        assert all(_gone(p) for p in pids), "expert processes outlived the engine"
        time.sleep(0.5)
        assert not list(Path("/dev/shm").glob(f"msjax-m2n-{channel}-*"))
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()
        for p in pids:
            if not _gone(p):
                os.kill(p, signal.SIGKILL)
