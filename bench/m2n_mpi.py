"""One rank of bench/m2n.py's `mpi` row; mpirun starts M+N of these (bench/m2n.py builds the command).

Ranks 0..N-1 are the receivers, N..N+M-1 the senders. Each round is one MPI_Alltoallv over all M+N ranks in
which only the sender -> receiver counts are non-zero, timed like the other rows: a barrier (outside the timed
window), then CLOCK_MONOTONIC stamps around the collective on every rank. Rank 0 gathers every rank's stamps and
writes them as JSON to the path it is given; bench/m2n.py turns them into rows with the same code as the others.

    mpirun -n M+N python bench/m2n_mpi.py '{"M":..,"N":..,"sizes":[..],"rounds":[..],"warmup":3,"cap":..}' OUT

mpi4py is imported in main() only, so the pure layout below is importable (and tested) without MPI.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def alltoallv_layout(rank: int, m: int, n: int, nbytes: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """(send counts, send displacements, receive counts, receive displacements) in bytes for `rank` of M+N.

    A sender sends the same `nbytes` of its one buffer to every receiver (displacement 0 for all: MPI lets send
    regions overlap, and msjax's senders also send one buffer N times); a receiver takes sender i's message at
    i * nbytes (M distinct slots, as msjax's receivers have). Receivers send nothing, senders receive nothing."""
    size = m + n
    zeros = [0] * size
    if rank < n:  # receiver: one message from each sender rank n..n+m-1
        counts = [0] * n + [nbytes] * m
        displs = [0] * n + [i * nbytes for i in range(m)]
        return zeros, zeros, counts, displs
    return [nbytes] * n + [0] * m, zeros, zeros, zeros


def payload(rank: int, cap: int) -> np.ndarray:
    """A sender rank's buffer: random bytes a receiver can regenerate to check what it got."""
    return np.random.default_rng(rank).integers(0, 256, cap, dtype=np.uint8)


def check(recv: np.ndarray, m: int, n: int, nbytes: int, cap: int) -> None:
    """After a size's last round (outside the timed window): every sender's message arrived where the layout
    put it, so the rows measure real transfers."""
    for i in range(m):
        if not np.array_equal(recv[i * nbytes:(i + 1) * nbytes], payload(n + i, cap)[:nbytes]):
            raise SystemExit(f"m2n_mpi: wrong bytes from sender {i} at {nbytes} bytes")


def main(argv: list[str]) -> None:
    from mpi4py import MPI

    cfg, out = json.loads(argv[0]), argv[1]
    comm = MPI.COMM_WORLD
    rank, m, n = comm.Get_rank(), cfg["M"], cfg["N"]
    if comm.Get_size() != m + n:
        raise SystemExit(f"m2n_mpi: {comm.Get_size()} ranks, the config needs M+N = {m + n}")
    cap = cfg["cap"]
    # a one-byte buffer on the side that moves nothing, so no rank hands MPI a NULL pointer
    send = payload(rank, cap) if rank >= n else np.zeros(1, np.uint8)
    recv = np.empty(m * cap if rank < n else 1, np.uint8)
    times = []
    for nbytes, rounds in zip(cfg["sizes"], cfg["rounds"]):
        sc, sd, rc, rd = alltoallv_layout(rank, m, n, nbytes)
        sendspec, recvspec = [send, (sc, sd), MPI.BYTE], [recv, (rc, rd), MPI.BYTE]
        stamps = []
        for _ in range(cfg["warmup"] + rounds):
            comm.Barrier()
            start = time.monotonic_ns()
            comm.Alltoallv(sendspec, recvspec)
            stamps.append((start, time.monotonic_ns()))
        times.append(stamps[cfg["warmup"]:])
        if rank < n:
            check(recv, m, n, nbytes, cap)
    gathered = comm.gather(times, root=0)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)


if __name__ == "__main__":
    main(sys.argv[1:])
