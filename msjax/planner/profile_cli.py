"""`msjax profile`: measure T_a(b) and T_e(b) of a model on this machine and write them as a profile file for
`msjax plan --profile` (paper §4.2: the coefficients come from profiling).

    msjax profile --model mixtral-8x7b --batches 8,16,32,64 --context 1024 --layers 2 --gpu H100 --out prof.toml

Each node is timed running its own layer programs (`msjax.runtime.layer_programs`),
the other node replaced by a loopback through shared memory: what a multi-process deployment runs, M2N copies
included. The model is built with `--layers` layers of random weights (times do not depend on the values, and a
few layers fit one device where the whole model may not). T_a per layer is the difference between the attention
step of a model with 1 + layers layers and one with 1 layer, divided by `layers`: what a step does once
(embeddings, LM head, sampling) cancels out.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from pathlib import Path


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--batches must be comma-separated integers, got {text!r}") from None
    if len(sizes) < 2 or sizes[0] < 1:
        raise ValueError(f"--batches needs at least two different positive sizes to fit a line, got {text!r}")
    return sizes


def run(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from msjax.errors import ConfigError
    from msjax.models.programs import MoEModel
    from msjax.planner.profile import parse_profile
    from msjax.planner.profiler import measure_layer_times, profile_toml
    from msjax.planner.search import resolve_model
    sizes = _sizes(args.batches)
    if args.layers < 1:
        raise ValueError(f"--layers must be at least 1, got {args.layers}")
    if args.context < 1:
        raise ValueError(f"--context must be at least 1, got {args.context}")
    cfg = resolve_model(args.model)
    dtype = jnp.dtype(args.dtype)
    deep = MoEModel.random(dataclasses.replace(cfg, num_layers=1 + args.layers), dtype=dtype)
    measured = measure_layer_times(deep, sizes, args.context, repeats=args.repeats, layers=args.layers)
    bad = [b for b, t in zip(sizes, measured["attention_s"]) if t <= 0]
    if bad:
        raise ValueError(f"the attention time per layer came out non-positive at batch {bad} (noise larger than "
                         "a layer): profile more layers (--layers) or more repeats (--repeats)")
    text = (f"# msjax profile --model {args.model}: {1 + args.layers} layers of random {args.dtype} weights, context "
            f"{args.context}; time per layer and micro-batch, from each node's own layer programs\n"
            + profile_toml(measured, gpu=args.gpu))
    try:  # what `msjax plan --profile` will check: refuse to write a file it would reject
        parse_profile(tomllib.loads(text), source="the measured profile")
    except ConfigError as err:
        raise ValueError(f"{err}; the batch sizes may be too close for this model's noise: spread them "
                         "(--batches) or time more steps (--repeats)") from None
    Path(args.out).write_text(text)
    print(f"{'batch':>6} {'T_a ms':>8} {'T_e ms':>8}")
    for b, t_a, t_e in zip(sizes, measured["attention_s"], measured["expert_s"]):
        print(f"{b:>6} {1e3 * t_a:>8.3f} {1e3 * t_e:>8.3f}")
    print(f"wrote {args.out} (use it with msjax plan --profile {args.out}; its entries are for gpu {args.gpu!r})")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "profile", help="measure T_a(b), T_e(b) of a model on this machine for `msjax plan --profile`",
        description="Time each node's own layer programs (the other node replaced by a shared-memory loopback) at "
                    "several decode micro-batch sizes and write the points as a profile file.")
    parser.add_argument("--model", required=True, help="preset name or HF checkpoint directory (only its config "
                        "is read: the weights are random)")
    parser.add_argument("--batches", default="8,16,32,64", help="decode micro-batch sizes in sequences "
                        "(default 8,16,32,64)")
    parser.add_argument("--context", type=int, default=1024, help="tokens each sequence holds (default 1024)")
    parser.add_argument("--layers", type=int, default=2, help="layers timed beyond the first (default 2)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--gpu", default="local", help="catalog name the entries are for (default local)")
    parser.add_argument("--repeats", type=int, default=5, help="steps timed per point; the median counts")
    parser.add_argument("--out", required=True, help="profile file to write (TOML)")
    parser.set_defaults(run=run)
    return parser
