"""The performance model against reality: profile T_a(b), T_e(b) with the real programs on this machine, fit the
model, predict decode step times for m = 1..4, and compare with the step times `bench/pipeline.py` measures.

    .venv/bin/python bench/planner_check.py [--batch 64] [--context 256]

Predictions use the micro-batch sizes the engine really runs (decode batches are padded to powers of two). In
one process of XLA:CPU devices the two groups share the cores, so the matching model is the serial one
(every program after the other); the table also shows the paper's overlapped pipeline (Eq. 5) for contrast.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_results  # noqa: E402
from bench.pipeline import BALANCED, measure  # noqa: E402
from msjax.engine.batch import decode_bucket  # noqa: E402
from msjax.models.programs import MoEModel  # noqa: E402
from msjax.planner.profiler import fit, measure_host_seconds, measure_layer_times, predicted_step_seconds  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    model = MoEModel.random(BALANCED, seed=0)
    sizes = {m: decode_bucket(-(-args.batch // m), args.batch) for m in (1, 2, 3, 4)}
    order = sorted(sizes, key=sizes.get)
    measured_layers = measure_layer_times(model, [sizes[m] for m in order], args.context, micro_batches=order)
    t_a, t_e, t_c, t_o = fit(measured_layers)
    rows = []
    for m, b in sizes.items():
        step_s, _ = measure(model, m, args.batch, args.context, args.steps, None)
        t_host = measure_host_seconds(BALANCED, args.batch, args.context, m)
        serial = predicted_step_seconds(t_a, t_e, BALANCED.num_layers, b * m, m, overlap=False, t_c=t_c, t_o=t_o,
                                        t_host=t_host)
        overlapped = predicted_step_seconds(t_a, t_e, BALANCED.num_layers, b * m, m, overlap=True, t_c=t_c,
                                            t_o=t_o, t_host=t_host)
        rows.append({"m": m, "micro_batch": b, "measured_ms": round(1e3 * step_s, 1),
                     "host_ms": round(1e3 * t_host, 1),
                     "predicted_ms": round(1e3 * serial, 1), "error": f"{serial / step_s - 1:+.0%}",
                     "overlapped_ms": round(1e3 * overlapped, 1)})
        print(rows[-1], flush=True)
    def show(name, c):
        return f"{name}(b) = {1e3 * c.slope:.4f} ms x b + {1e3 * c.intercept:.3f} ms"

    notes = (f"{show('T_a', t_a)}, {show('T_e', t_e)}, {show('T_c', t_c)} per layer; {show('T_o', t_o)} per "
             f"micro-batch (embed, head, sampling); fitted on {measured_layers['batch']}. Model: {BALANCED.num_layers} layers of bench/pipeline.py's random MoE, "
             f"decode batch {args.batch}, context {args.context}, one attention + one expert node in one process. "
             "Predicted = the serial model (groups share the cores); 'overlapped' = the paper's Eq. 5 pipeline, "
             "which needs separate hardware per group. What the prediction leaves out is the engine's host work "
             "(scheduling, batch building, detokenising) and dispatch that overlaps nothing.")
    path = write_results("planner-check", rows, [("m", "m"), ("micro_batch", "micro-batch (padded)"),
                                                 ("measured_ms", "measured step (ms)"),
                                                 ("host_ms", "engine host work (ms)"),
                                                 ("predicted_ms", "predicted (ms)"), ("error", "error"),
                                                 ("overlapped_ms", "Eq. 5 overlapped (ms)")], notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
