"""Compile time against model depth: the first requests of a fresh deployment (every program compiled) minus
the same requests again (nothing compiled), for 2 and 8 layers of one tiny config, with every node in the
engine's process ("inprocess") and with the expert node a process of its own ("multiprocess", plan transport
shm). Each node runs one program per layer, reused for every layer, so the compile time should not grow with
depth.

    .venv/bin/python bench/compile_depth.py [--json PATH] [--layers 2,8]

Each (placement, layers) point runs in a fresh Python process (no compile cache shared between points). Only
the public API is used (`msjax.Engine`, `DeploymentPlan`), so the same script measures older revisions too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLACEMENTS = {"inprocess": dict(transport="auto"), "multiprocess": dict(transport="shm")}


def one(placement: str, layers: int) -> dict:
    """Cold and warm wall time of the same requests (a prefill and 4 decode steps each) in one deployment."""
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    sys.path.insert(0, str(ROOT))
    from msjax import Engine, EngineConfig, SamplingParams
    from msjax.config import DeploymentPlan
    from msjax.models.programs import MoEModel
    from tests.model_utils import tiny_config
    cfg = dataclasses.replace(tiny_config(), num_layers=layers)
    plan = DeploymentPlan(1, 1, 1, 1, 2, **PLACEMENTS[placement])
    engine = Engine(MoEModel.random(cfg, seed=0), EngineConfig(page_size=8, num_pages=32, max_num_seqs=4,
                                                               max_num_batched_tokens=32, max_model_len=64),
                    plan=plan)
    sampling = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)

    def requests(tag: str) -> float:
        start = time.perf_counter()
        for i in range(2):
            engine.add_request(f"{tag}{i}", [3 + i, 5, 7, 11, 13, 17, 19, 23, 29, 31][:8 - i], sampling)
        while engine.has_unfinished():
            engine.step()
        return time.perf_counter() - start

    try:
        cold, warm = requests("cold"), requests("warm")
    finally:
        engine.close()
    return {"layers": layers, "compile_s": round(cold - warm, 3), "placement": placement,
            "cold_s": round(cold, 3), "warm_s": round(warm, 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here too")
    parser.add_argument("--layers", default="2,8")
    parser.add_argument("--one", nargs=2, metavar=("PLACEMENT", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return
    rows = []
    for placement in PLACEMENTS:
        for layers in (int(x) for x in args.layers.split(",")):
            out = subprocess.run([sys.executable, __file__, "--one", placement, str(layers)], capture_output=True,
                                 text=True, check=True, cwd=ROOT)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    for placement in PLACEMENTS:
        by_layers = {r["layers"]: r["compile_s"] for r in rows if r["placement"] == placement}
        low, high = min(by_layers), max(by_layers)
        print(f"{placement}: compile at {high} layers / at {low} = {by_layers[high] / by_layers[low]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    sys.path.insert(0, str(ROOT))
    from bench.common import write_results
    notes = ("Compile time = wall time of two requests (a prefill and 4 decode steps each, greedy) in a fresh "
             "deployment minus the same requests again in it; tiny config of tests/model_utils.py (hidden 32, 5 "
             "experts top-2, float32) with the layer count varied; plan 1 attention node, 1 expert node, m = 2; "
             "inprocess: both nodes in the engine's process (transport auto), multiprocess: the expert node a "
             "process (transport shm), its compile inside the first step. Each point in a fresh Python process.")
    path = write_results("compile-depth", rows, [("placement", "placement"), ("layers", "layers"),
                                                 ("compile_s", "compile (s)"), ("cold_s", "first requests (s)"),
                                                 ("warm_s", "again (s)")], notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
