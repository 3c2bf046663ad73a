"""The profiler's loopback timings of the multi-process nodes' own step programs: each node's program runs
with its peer replaced by messages sent ahead into a deep shared-memory ring and collected after it (a message
out of order or left behind would time out, or break the next step's sequence numbers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from msjax.comm import native
from msjax.models.programs import MoEModel
from msjax.planner.profiler import measure_attention_program, measure_expert_program
from tests.model_utils import tiny_config

pytestmark = pytest.mark.skipif(not native.is_built(), reason="native M2N library not built")


@pytest.fixture(scope="module")
def model():
    return MoEModel.random(tiny_config(num_layers=2), seed=0)


def _no_segments_left():
    return not list(Path("/dev/shm").glob("msjax-m2n-profile*"))


def test_expert_node_program_over_a_loopback(model):
    seconds = measure_expert_program(model, [(4, 2), (8, 1)], repeats=2)
    assert len(seconds) == 2 and all(0 < s < 1 for s in seconds)
    assert _no_segments_left()


def test_attention_node_program_over_a_loopback(model):
    seconds = measure_attention_program(model, [(4, 2), (8, 1)], context=20, repeats=2)
    assert len(seconds) == 2 and all(0 < s < 5 for s in seconds)
    assert _no_segments_left()


@pytest.mark.slow  # full suite only: the quick subset stays under 5 minutes
def test_msjax_profile_writes_a_profile_that_plan_reads(tmp_path, capsys):
    from msjax.cli import main
    from msjax.planner import plan
    from msjax.planner.search import resolve_profile
    out = tmp_path / "profile.toml"
    assert main(["profile", "--model", "tiny-moe", "--batches", "4,64", "--context", "32", "--layers", "4",
                 "--dtype", "float32", "--repeats", "5", "--gpu", "H100", "--out", str(out)]) == 0
    profile = resolve_profile(out)  # the planner's own parser: a malformed file would raise
    best = plan("tiny-moe", ["H100"], 150, profile=profile, top=1)[0]
    assert best.prediction.source == "measured"  # the plan used the profiled coefficients, not the roofline
    assert "wrote" in capsys.readouterr().out


def test_msjax_profile_refuses_a_single_batch_size(tmp_path, capsys):
    from msjax.cli import main
    assert main(["profile", "--model", "tiny-moe", "--batches", "8", "--out", str(tmp_path / "p.toml")]) == 2
    assert "at least two different positive sizes" in capsys.readouterr().err
    assert not (tmp_path / "p.toml").exists()
