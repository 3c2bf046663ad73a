"""`msjax launch`: generation over a multi-process deployment on this host — every expert node is its own
process, and so is every attention node with --attention-processes (or the plan's `attention_processes = true`;
otherwise the engine's process holds them); packets move through the native M2N library (plan transport "shm",
"tcp" or "rdma"). Each node process reads its own weights from the checkpoint.

    python -m msjax.launch --plan plan.toml --model tiny-moe --prompt "Beautiful is" --max-tokens 16

`main(argv)` returns an exit code; `msjax.cli` wires it in as `msjax launch`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msjax launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", required=True, help="deployment plan TOML ([plan] table); transport shm or tcp")
    p.add_argument("--model", default="tiny-moe", help="HF checkpoint directory or preset name (default tiny-moe)")
    p.add_argument("--transport", choices=["shm", "tcp", "rdma"], help="override the plan's transport")
    p.add_argument("--attention-processes", action="store_true",
                   help="run every attention node as a process too (the engine's process then only schedules)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); text needs a tokenizer")
    p.add_argument("--prompt-ids", action="append", help="a prompt as comma-separated token ids (repeatable)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--num-pages", type=int, default=64)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-num-batched-tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds an M2N exchange may wait (default 60)")
    p.add_argument("--json", action="store_true", help="print one JSON object per request")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import jax.numpy as jnp

    from msjax.comm.transports import is_in_process
    from msjax.config import DeploymentPlan, EngineConfig
    from msjax.engine.engine import Engine, generation_eos
    from msjax.engine.sampling_params import SamplingParams
    from msjax.errors import ConfigError
    from msjax.loading import load, resolve_model_path
    from msjax.runtime.runner import make_runner
    from msjax.tokenizer import load_tokenizer

    try:
        plan = DeploymentPlan.load(args.plan)
        if args.transport:
            plan = dataclasses.replace(plan, transport=args.transport)
        if args.attention_processes:
            plan = dataclasses.replace(plan, attention_processes=True)
        if plan.is_colocated or is_in_process(plan.transport):
            raise ConfigError("transport", f"msjax launch runs nodes as processes: the plan needs transport "
                              f"'shm', 'tcp' or 'rdma', got {plan.transport!r} (or pass --transport)")
    except (ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    prompts: list = list(args.prompt or []) + [[int(t) for t in p.split(",")] for p in (args.prompt_ids or [])]
    if not prompts:
        print("error: give at least one --prompt or --prompt-ids", file=sys.stderr)
        return 2
    config = EngineConfig(page_size=args.page_size, num_pages=args.num_pages, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, dtype=args.dtype)
    path = resolve_model_path(args.model)
    model = load(args.model, dtype=jnp.float32 if args.dtype == "float32" else jnp.bfloat16)
    start = time.perf_counter()
    try:
        runner = make_runner(model, config, plan, checkpoint=path, timeout_s=args.timeout)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter() - start
    try:
        engine = Engine(model, config, plan=plan, tokenizer=load_tokenizer(path), eos_token_ids=generation_eos(path),
                        runner=runner)
    except BaseException:
        runner.close()
        raise
    with engine:
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
        out: dict[str, dict] = {}
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, sampling)
            out[f"r{i}"] = {"prompt": prompt, "token_ids": [], "text": "" if engine.tokenizer else None}
        while engine.has_unfinished():
            for d in engine.step():
                out[d.request_id]["token_ids"] += d.token_ids
                if d.text is not None:
                    out[d.request_id]["text"] += d.text
                if d.finished:
                    out[d.request_id]["finish_reason"] = d.finish_reason
    elapsed = time.perf_counter() - start
    for rid, r in out.items():
        shown = r["text"] if r["text"] is not None else r["token_ids"]
        print(json.dumps({"request_id": rid, **r}) if args.json else f"{rid}: {shown}")
    where = "process(es)" if plan.attention_processes else "node(s) in this process"
    print(f"# {plan.attention_nodes} attention {where}, {plan.expert_nodes} expert process(es) over "
          f"{plan.transport}; start-up {started:.1f} s, total {elapsed:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
