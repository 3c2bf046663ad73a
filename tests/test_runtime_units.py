"""The runtime's device-free parts: plan resolution (one place for every check), the phase order in which the
runner's process dispatches its nodes' programs, the environment of node processes (their platform, never a
forced CPU), and every runner speaking the whole Runner protocol."""

from __future__ import annotations

import types

import pytest

from msjax.config import DeploymentPlan, EngineConfig
from msjax.errors import ConfigError
from msjax.runtime import protocol as p
from msjax.runtime.deployment import engine_limits, resolve
from msjax.runtime.hosts import LocalHost
from msjax.runtime.processes import node_env
from tests.model_utils import tiny_config

CFG = tiny_config()
EC = EngineConfig(page_size=8, num_pages=24, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=96)


def cpus(n: int):
    return [types.SimpleNamespace(platform="cpu", local_hardware_id=i, id=i) for i in range(n)]


def gpus(n: int):
    return [types.SimpleNamespace(platform="gpu", local_hardware_id=i, id=i, compute_capability="9.0")
            for i in range(n)]


# -- resolution ----------------------------------------------------------------------------------------------

def test_the_plan_resolves_once_into_limits_devices_and_transport():
    d = resolve(CFG, EC, DeploymentPlan(2, 1, 3, 1, 2, max_batch=7), cpus(8))
    assert d.engine.max_num_seqs == 4 == engine_limits(EC, d.plan).max_num_seqs  # ceil(7 / 2)
    assert d.transport == "loopback" and not d.attention_processes and not d.expert_processes
    assert [[x.id for x in a] for a in d.attention_devices] == [[0], [1]]
    assert [[x.id for x in e] for e in d.expert_devices] == [[2], [3], [4]]
    assert d.ring_depth == 3 and d.max_tokens == 32 and d.num_replicas == 2
    d = resolve(CFG, EC, DeploymentPlan(1, 3, 2, 3, 1, transport="shm"), cpus(3))
    assert d.transport == "shm" and d.expert_processes and not d.expert_devices and len(d.attention_devices[0]) == 3
    d = resolve(CFG, EC, None, cpus(8))
    assert d.is_colocated and len(d.devices) == 1 and d.micro_batches == 1


@pytest.mark.parametrize("plan,devices,error", [
    (DeploymentPlan(2, 1, 3, 1, 1), 4, "plan: needs 5 devices, only 4 exist"),
    (DeploymentPlan(2, 3, 1, 1, 1, transport="tcp"), 5,
     r"needs 6 devices in this process \(the expert nodes are processes\)"),
    (DeploymentPlan(1, 1, 1, 1, 1, attention_processes=True), 8, "attention_processes: puts nodes in processes"),
    (DeploymentPlan(1, 1, 6, 1, 1), 8, "expert_nodes: 6 expert nodes for 5 experts"),
    (DeploymentPlan.colocated(9), 8, "plan: needs 9 devices, only 8 exist"),
])
def test_resolution_errors_name_the_field(plan, devices, error):
    with pytest.raises(ConfigError, match=error):
        resolve(CFG, EC, plan, cpus(devices))


def test_engine_limits_are_checked_with_the_plan():
    with pytest.raises(ConfigError, match="num_pages: 2 pages of 8 tokens cannot hold one sequence"):
        resolve(CFG, EngineConfig(page_size=8, num_pages=2, max_model_len=96), DeploymentPlan(1, 1, 1, 1, 1),
                cpus(2))


def test_insisting_on_the_kernels_needs_a_hopper_gpu():
    with pytest.raises(ConfigError, match="kernels: 'kernel' needs a Hopper GPU.*'interpret'"):
        resolve(CFG, EngineConfig(kernels="kernel"), None, cpus(1))


def test_node_processes_get_gpus_after_the_ones_this_process_uses():
    d = resolve(CFG, EC, DeploymentPlan(1, 3, 2, 1, 1, transport="tcp"), gpus(5))
    assert d.platform == "gpu" and len(d.attention_devices[0]) == 3
    assert d.device_ids == {("expert", 0): (3,), ("expert", 1): (4,)}
    with pytest.raises(ConfigError, match="needs 6 gpu devices on this host, 5 exist"):
        resolve(CFG, EC, DeploymentPlan(1, 3, 3, 1, 1, transport="tcp"), gpus(5))


# -- node processes: the plan's platform -----------------------------------------------------------------------

def _spec(platform: str, tp: int, device_ids=()):
    topology = p.Topology("run", "shm", "127.0.0.1:1", "t", 1, 1, 2, 1, 1, 1, 1, 1.0, 1.0)
    return p.NodeSpec("expert", 0, CFG, EC, "float32", "auto", tp, platform, ((0, 1, 2, 3, 4),), topology,
                      device_ids=device_ids)


def test_a_cpu_node_process_forces_its_own_host_devices():
    env = node_env(_spec("cpu", 3), {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1"})
    assert env["JAX_PLATFORMS"] == "cpu"
    assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=3"]


def test_a_gpu_node_process_runs_on_its_gpus_not_on_the_cpu():
    env = node_env(_spec("gpu", 2, (2, 3)), {"JAX_PLATFORMS": "cpu",
                                               "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert env["JAX_PLATFORMS"] == "cuda" and env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert "host_platform_device_count" not in env["XLA_FLAGS"]


# -- the runner's process: phase order ---------------------------------------------------------------------

class _Node:
    """Records when each of its programs would be dispatched."""

    def __init__(self, name: str, phases: list[int], log: list):
        self.name, self.phases, self.log = name, phases, log

    def step(self, request):
        for phase in self.phases:
            yield phase
            self.log.append((phase, self.name))
        return p.StepDone(request.step)

    def control(self, request):
        return p.Pong(self.name, 0, 0)

    def result(self, reply):
        return reply

    def close(self):
        pass


def test_nodes_in_the_runners_process_are_driven_in_phase_order():
    """Two attention nodes (phases 0, 2, 4, 6) and two expert nodes (1, 3, 5), submitted experts first: every
    program of a phase is dispatched before any of the next, whatever the order of submission."""
    log = []
    host = LocalHost()
    for name, phases in [("e0", [1, 3, 5]), ("e1", [1, 3, 5]), ("a0", [0, 2, 4, 6]), ("a1", [0, 2, 4, 6])]:
        host.add(name, _Node(name, phases, log))
        host.submit(name, p.ExpertStep(1, ()) if name[0] == "e" else p.AttentionStep(1, ()))
    assert host.reply("a1") == p.StepDone(1)
    assert [phase for phase, _ in log] == sorted(phase for phase, _ in log)
    assert log[:4] == [(0, "a0"), (0, "a1"), (1, "e0"), (1, "e1")]
    assert all(host.reply(k) == p.StepDone(1) for k in ("e0", "e1", "a0"))
    host.submit("e0", p.Ping())
    assert host.reply("e0") == p.Pong("e0", 0, 0)


# -- the Runner protocol ---------------------------------------------------------------------------------------

def test_every_runner_speaks_the_whole_protocol():
    from msjax.models.programs import MoEModel
    from msjax.runtime.runner import NoDeviceRunner, Runner, make_runner
    model = MoEModel.random(tiny_config(num_layers=1), seed=0)
    colocated = make_runner(model, EC)
    nodes = make_runner(model, EC, DeploymentPlan(1, 1, 1, 1, 1))
    try:
        for runner in (colocated, nodes, NoDeviceRunner()):
            assert isinstance(runner, Runner), type(runner).__name__
        assert colocated.expert_load() is None and colocated.health().healthy
        with pytest.raises(ConfigError, match="needs a disaggregated plan"):
            colocated.set_placement(((0, 1, 2, 3, 4),))
        with pytest.raises(ConfigError, match="timeline needs a disaggregated plan"):
            colocated.attach_timeline(object())
        health = nodes.health()
        assert health.healthy and {(n.role, n.where) for n in health.nodes} == {("attention", "local"),
                                                                                 ("expert", "local")}
        assert list(nodes.expert_load()) == [0] * CFG.num_experts
        with pytest.raises(ConfigError, match=r"placement: experts \[4\] are on no expert node"):
            nodes.set_placement(((0, 1, 2, 3),))
    finally:
        colocated.close()
        nodes.close()
    assert not nodes.health().healthy and nodes.health().detail == "closed"
