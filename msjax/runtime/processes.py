"""Node processes on this host: starting `python -m msjax.runtime.node_process` for a `NodeSpec`, on the
platform the deployment runs on, and watching them (exit codes, log tails for error messages, stopping).

A node process sees only its own devices: on CPU, `tp` host devices (XLA's forced host platform device count);
on GPUs, the GPUs of its `device_ids` (CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from msjax.comm import wire
from msjax.runtime.hosts import WorkerError

_ROOT = str(Path(__file__).resolve().parents[2])


def node_env(spec, base: dict | None = None) -> dict:
    """The environment of the process for `spec`: its platform and device count, the repository importable,
    output unbuffered (its log is how a failure is explained)."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    if spec.platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        if spec.tp > 1:
            flags.append(f"--xla_force_host_platform_device_count={spec.tp}")
    else:
        env["JAX_PLATFORMS"] = {"gpu": "cuda"}.get(spec.platform, spec.platform)
        if spec.device_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, spec.device_ids))
    env["XLA_FLAGS"] = " ".join(flags)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([_ROOT, *filter(None, [env.get("PYTHONPATH")])])
    return env


class NodeProcess:
    """One node process: `name` ("expert node 1"), `pid`, `alive()`, `returncode`, `log_tail()`, `stop()`."""

    def __init__(self, spec, folder: Path, python: str | None = None, generation: int = 0):
        self.role, self.index = spec.role, spec.index
        self.name = f"{spec.role} node {spec.index}"
        stem = f"{spec.role}{spec.index}" + (f"-g{generation}" if generation else "")  # a restart: a log of its own
        self.log = folder / f"{stem}.log"
        path = folder / f"{stem}.spec"
        path.write_bytes(wire.encode(spec))  # deleted by the node once read: it may name weights
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([python or sys.executable, "-m", "msjax.runtime.node_process", "--spec",
                                          str(path)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=node_env(spec), start_new_session=True)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def exited(self, when: str = "") -> str:
        """What an error says of this process once it exited."""
        return f"{self.name} (pid {self.pid}) exited with code {self.returncode}" + (f" {when}" if when else "")

    @property
    def returncode(self):
        return self.proc.poll()

    def log_tail(self, lines: int = 30) -> str:
        if not self.log.exists():
            return ""
        tail = self.log.read_text(errors="replace").splitlines()[-lines:]
        return f"\n--- {self.name} (pid {self.pid}) log tail ---\n" + "\n".join(tail)

    def stop(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for it to exit (after a Stop request), then kill it."""
        try:
            self.proc.wait(max(0.0, timeout_s))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class NodeProcesses:
    """The node processes of one deployment."""

    def __init__(self):
        self.procs: dict = {}  # (role, index) -> NodeProcess

    def add(self, proc: NodeProcess) -> None:
        self.procs[proc.role, proc.index] = proc

    def __iter__(self):
        return iter(self.procs.values())

    def logs(self) -> str:
        return "".join(proc.log_tail() for proc in self)

    def dead(self) -> list[NodeProcess]:
        return [proc for proc in self if not proc.alive()]

    def check(self, when: str) -> None:
        """WorkerError naming the first node process that exited, with every log tail."""
        for proc in self.dead():
            raise WorkerError(proc.exited(when) + self.logs())

    def stop(self, timeout_s: float) -> None:
        import time
        deadline = time.monotonic() + timeout_s
        for proc in self:
            proc.stop(deadline - time.monotonic())
