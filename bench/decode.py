"""Decode throughput and time per output token against batch size, end to end through the engine, optionally
side by side with HF transformers on the same checkpoint in the same run.

    .venv/bin/python bench/decode.py [--model tiny-moe|olmoe-2l|DIR] [--batch-sizes 1,2,4,8,16,32]
        [--prompt-len 32] [--max-tokens 64] [--dtype float32] [--peer hf] [--json PATH]

Each batch size runs B requests with the same prompt length; after their prefill, every step is a decode step
of B tokens. Reported: the median decode step time (= time per output token of each request), tokens/s over all
decode steps, and the prefill time. Compilation is excluded (a warm-up round per batch size runs first); each
row is the best of three rounds.

`--peer hf` runs the same batches, prompts, checkpoint and greedy decoding through HF `generate`
(bench/peer_hf.py, in the peer venv that tools/setup-peer.sh makes), right after msjax in the same run, and
checks that both give the first request of each batch the same greedy tokens. For a model with `--roofline`
(on by default for olmoe-2l) the batch-1 rows also get the roofline: the bytes a decode step must read (see
`bench.hf_models.weight_bytes_read_per_token`) over the copy bandwidth numpy measures in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_results  # noqa: E402
from bench.hf_models import copy_bandwidth, model_dir, weight_bytes_read_per_token  # noqa: E402
from msjax import Engine, SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"


def prompt_ids(i: int, prompt_len: int, vocab: int) -> list[int]:
    """Request i's prompt (bench/peer_hf.py builds the same)."""
    return [(7 * i + j) % vocab for j in range(prompt_len)]


def run_batch(engine: Engine, batch: int, prompt_len: int, max_tokens: int, tag: str) -> dict:
    vocab = engine.model_config.vocab_size
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", prompt_ids(i, prompt_len, vocab), sp)
    first: list[int] = []

    def step():
        deltas = engine.step()
        for d in deltas:
            if d.request_id == f"{tag}-0":
                first.extend(d.token_ids)
        return deltas

    started = time.perf_counter()
    produced = 0
    while produced < batch:  # prefill steps: each request gets its first token
        produced += sum(len(d.token_ids) for d in step())
    prefill_s = time.perf_counter() - started
    step_times = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        step()
        step_times.append(time.perf_counter() - t0)
    return {"prefill_s": prefill_s, "step_times": step_times, "first_ids": first}


def run_msjax(path: Path, sizes: list[int], args) -> list[dict]:
    engine = Engine.from_pretrained(str(path), dtype=args.dtype, max_num_seqs=max(sizes),
                                    max_num_batched_tokens=max(256, args.prompt_len),
                                    num_pages=max(sizes) * (-(-(args.prompt_len + args.max_tokens) // 16) + 1),
                                    max_model_len=args.prompt_len + args.max_tokens + 16)
    rows = []
    for b in sizes:
        run_batch(engine, b, args.prompt_len, 4, f"warm{b}")  # compile this batch's buckets
        # best of three rounds: a shared 2-core VM has stalls that are not the engine's
        r = min((run_batch(engine, b, args.prompt_len, args.max_tokens, f"run{b}-{k}") for k in range(3)),
                key=lambda r: statistics.median(r["step_times"]))
        rows.append({"impl": "msjax", "batch": b, "step_ms": round(1e3 * statistics.median(r["step_times"]), 3),
                     "tok_s": round(b * len(r["step_times"]) / sum(r["step_times"]), 1),
                     "prefill_ms": round(1e3 * r["prefill_s"], 1), "dtype": args.dtype,
                     "first_ids": r["first_ids"]})
        print({k: v for k, v in rows[-1].items() if k != "first_ids"}, flush=True)
    engine.close()
    return rows


def run_hf(path: Path, sizes: list[int], args) -> list[dict]:
    if not PEER_PYTHON.exists():
        sys.exit(f"--peer hf needs the peer venv {PEER_PYTHON.parent.parent}: run bash tools/setup-peer.sh")
    command = [str(PEER_PYTHON), str(ROOT / "bench" / "peer_hf.py"), "--model-dir", str(path),
               "--batch-sizes", ",".join(map(str, sizes)), "--prompt-len", str(args.prompt_len),
               "--max-tokens", str(args.max_tokens), "--dtype", args.dtype]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for row in rows:
        print({k: v for k, v in row.items() if k != "first_ids"}, flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-moe", help="tiny-moe, olmoe-2l, or an HF directory")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--peer", choices=("hf",), help="also run HF transformers on the same checkpoint")
    parser.add_argument("--roofline", action=argparse.BooleanOptionalAction, default=None,
                        help="batch-1 roofline from the measured copy bandwidth (default: on for olmoe-2l)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    path = model_dir(args.model)
    rows = run_msjax(path, sizes, args)
    if args.peer == "hf":
        peer = {r["batch"]: r for r in run_hf(path, sizes, args)}
        for row in rows:
            hf = peer[row["batch"]]
            same = hf["first_ids"] == row["first_ids"]
            row["same_greedy"] = hf["same_greedy"] = "yes" if same else "NO"
            row["vs_hf"] = hf["vs_hf"] = f"{row['tok_s'] / hf['tok_s']:.2f}x"
        rows = [r for row in rows for r in (row, peer[row["batch"]])]
    from msjax.models.families import read_config
    cfg = read_config(path)
    roofline = args.roofline if args.roofline is not None else args.model == "olmoe-2l"
    if roofline:
        bandwidth = copy_bandwidth()
        context = args.prompt_len + args.max_tokens // 2  # the median decode step's context
        nbytes = weight_bytes_read_per_token(cfg, context, 4 if args.dtype == "float32" else 2)
        roof_ms = 1e3 * nbytes / bandwidth
        for row in rows:
            if row["batch"] == 1:
                row["roofline_ms"] = round(roof_ms, 2)
                row["of_roofline"] = f"{roof_ms / row['step_ms']:.0%}"
        print(f"roofline: {nbytes / 1e6:.0f} MB per batch-1 step / {bandwidth / 1e9:.1f} GB/s copy = "
              f"{roof_ms:.1f} ms", flush=True)
    blanks = {"roofline_ms": "", "of_roofline": "", "same_greedy": "", "vs_hf": "", "cache": "paged"}
    table = [{"model": args.model, **blanks, **{k: v for k, v in row.items() if k != "first_ids"}} for row in rows]
    notes = (f"Model `{args.model}` ({cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_experts} experts "
             f"top-{cfg.top_k}, {args.dtype}); msjax: the colocated single-program model, blocked paged "
             f"attention, the experts through the native CPU grouped matmul; prompt {args.prompt_len} tokens, "
             f"{args.max_tokens} output tokens, greedy, best of three rounds per batch.")
    if args.peer == "hf":
        notes += (f" hf: {peer[sizes[0]]['version']}, `generate` with the {peer[sizes[0]]['cache']} KV cache, the "
                  f"same prompts and checkpoint; step time between two consecutive logits-processor calls. "
                  f"same greedy: the first request of the batch got the same {args.max_tokens} tokens from both. "
                  f"vs hf: msjax tok/s over hf tok/s.")
    if roofline:
        notes += (" roofline (batch 1): the bytes a decode step must read (attention weights, the top-k routed "
                  "experts, embedding row, LM head, K/V) over the numpy copy bandwidth of a 1 GiB array measured "
                  "in this run; of roofline = roofline / step time.")
    columns = [("impl", "impl"), ("batch", "batch"), ("step_ms", "time per output token (ms)"),
               ("tok_s", "decode tokens/s"), ("prefill_ms", "prefill of the batch (ms)"), ("vs_hf", "vs hf"),
               ("same_greedy", "same greedy"), ("roofline_ms", "roofline (ms)"), ("of_roofline", "of roofline"),
               ("cache", "KV cache")]
    name = "decode" if args.model == "tiny-moe" and not args.peer else f"decode-{args.model}" + (
        f"-vs-{args.peer}" if args.peer else "")
    result = write_results(name, table, columns, notes)
    if args.json:
        args.json.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {result}")


if __name__ == "__main__":
    main()
