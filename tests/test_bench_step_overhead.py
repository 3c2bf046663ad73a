"""bench/step_overhead.py on tiny-moe for a few steps: the phases it reports add up to the step, and decoding
compiles nothing after the first steps (the engine's "no per-step recompiles" holds at every batch size here)."""

import pytest

from bench.step_overhead import PHASES, measure
from msjax.engine.batch import decode_bucket
from msjax.engine.engine import Engine


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny-moe", max_model_len=128)


@pytest.mark.parametrize("batch", [1, 3])
def test_phases_add_up_and_nothing_compiles(engine, batch):
    row = measure(engine, batch, 8, list(range(1, 17)))
    phases = sum(row[f"{k}_ms"] for k in PHASES)
    assert abs(phases - row["mean_step_ms"]) < 1e-2  # `other` is the rest of the step, by construction
    assert all(row[f"{k}_ms"] >= 0 for k in PHASES if k != "other")
    assert row["compiles"] == 0 and row["program_ms"] > 0
    assert row["rows"] == decode_bucket(batch, engine.config.max_num_seqs)  # the padded rows it ran
    assert not engine.has_unfinished()  # the measurement aborted its requests
