"""The ping-pong pipeline, measured: decode step time against the number of micro-batches m.

    .venv/bin/python bench/pipeline.py [--batch 64] [--context 256] [--micro-batches 1,2,3,4]

One attention node and one expert node (one device each) serve a random MoE whose attention and expert work per
step are of similar size. For each m: the median decode step time, tokens/s, and each group's busy fraction
from the device timeline (JAX profiler), plus the timeline picture of one traced step.

Here (CPU, forced host devices) the two nodes are two XLA:CPU devices in one process, exchanging packets over
the loopback transport: each program already uses every core, so the groups cannot overlap and m > 1 only adds
work. bench/pipeline_pinned.py measures the same nodes in separate processes pinned to separate cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, hardware_name, slug, write_results  # noqa: E402
from msjax import Engine, EngineConfig  # noqa: E402
from msjax.config import DeploymentPlan, ModelConfig  # noqa: E402
from msjax.models.programs import MoEModel  # noqa: E402
from msjax.planner.profiler import time_decode_steps  # noqa: E402
from msjax.runtime.timeline import Timeline  # noqa: E402

BALANCED = ModelConfig(architecture="MixtralForCausalLM", vocab_size=1024, hidden_size=512, num_layers=4,
                       num_heads=8, num_kv_heads=2, head_dim=64, num_experts=4, top_k=2, expert_ffn_size=512,
                       max_position_embeddings=1024)


def measure(model: MoEModel, m: int, batch: int, context: int, steps: int, trace_dir: Path | None):
    cfg = EngineConfig(page_size=16, num_pages=batch * (context // 16 + 2), max_num_seqs=batch,
                       max_num_batched_tokens=2048, max_model_len=context + steps + 16)
    engine = Engine(model, cfg, plan=DeploymentPlan(1, 1, 1, 1, m))
    step_s = time_decode_steps(engine, batch, context, steps)
    timeline = Timeline()
    engine.runner.attach_timeline(timeline)
    with timeline.trace(tempfile.mkdtemp()):
        engine.step()
    engine.runner.attach_timeline(None)
    if trace_dir is not None:
        timeline.save(trace_dir, f"decode step, batch {batch}, m={m} ({hardware_name()})")
    return step_s, timeline.busy_fraction()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--micro-batches", default="1,2,3,4")
    args = parser.parse_args()
    model = MoEModel.random(BALANCED, seed=0)
    rows = []
    for m in (int(x) for x in args.micro_batches.split(",")):
        trace_dir = RESULTS / f"pipeline-{slug(hardware_name())}-timeline-m{m}" if m == 2 else None
        step_s, busy = measure(model, m, args.batch, args.context, args.steps, trace_dir)
        rows.append({"m": m, "step_ms": round(1e3 * step_s, 1), "tok_s": round(args.batch / step_s, 1),
                     "attention_busy": f"{busy.get('attention', 0):.0%}",
                     "experts_busy": f"{busy.get('experts', 0):.0%}"})
        print(rows[-1], flush=True)
    c = BALANCED
    notes = (f"One attention node + one expert node, one device each, in one process (forced host devices). "
             f"Random MoE: {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads}/{c.num_kv_heads} heads, "
             f"{c.num_experts} experts top-{c.top_k}, FFN {c.expert_ffn_size}, float32; decode batch "
             f"{args.batch}, context {args.context}. Busy = share of one traced step in which the group's device "
             "executed (JAX profiler). Step time is the median over the measured steps. On this CPU machine one "
             "XLA:CPU program already uses both cores, so attention and experts cannot overlap in one process.")
    path = write_results("pipeline", rows, [("m", "micro-batches m"), ("step_ms", "decode step (ms)"),
                                            ("tok_s", "tokens/s"), ("attention_busy", "attention busy"),
                                            ("experts_busy", "experts busy")], notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
