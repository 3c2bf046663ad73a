"""`msjax plan`: search deployment plans and print them as a table.

    msjax plan --model mixtral-8x22b --gpus H20,L40S --slo-ms 150 --out plan.toml --plot plans.png

`add_parser(subparsers)` registers the command on the `msjax` argparse parser.
"""

from __future__ import annotations

import argparse

from msjax.planner.colocated import colocated_baseline
from msjax.planner.model import Workload
from msjax.planner.search import (MAX_MICRO_BATCHES, Candidate, by_cost_efficiency, plan, resolve_catalog,
                                  resolve_model, resolve_network, resolve_profile, search)

_COLUMNS = ("#", "attention", "experts", "m", "batch", "TPOT ms", "T_a ms", "T_e ms", "T_c ms", "tok/s",
            "tok/s/GPU", "tok/s/cost", "source")


def _row(rank: str, c: Candidate) -> tuple[str, ...]:
    p, x = c.plan, c.prediction
    if p.is_colocated:
        group = p.colocated_devices // p.micro_batches
        attention = f"{group}x{p.attention_gpu} colocated" + (f" x{p.micro_batches} PP" if p.micro_batches > 1 else "")
        experts, m = "(same GPUs)", "-"
    else:
        attention = f"{p.attention_nodes}x{p.attention_tp}x{p.attention_gpu}"
        experts, m = f"{p.expert_nodes}x{p.expert_tp}x{p.expert_gpu}", str(p.micro_batches)
    return (rank, attention, experts, m, str(x.batch), f"{x.tpot_ms:.1f}", f"{x.t_a_ms:.3f}", f"{x.t_e_ms:.3f}",
            f"{x.t_c_ms:.3f}", f"{x.tokens_per_s:,.0f}", f"{x.tokens_per_s_per_gpu:,.0f}",
            f"{x.tokens_per_s_per_cost:,.1f}", x.source)


def format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.rjust(w) if i not in (1, 2, 12) else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in [_COLUMNS, *rows]]
    lines.insert(1, "-" * max(map(len, lines)))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    catalog = resolve_catalog(args.catalog)
    profile = resolve_profile(args.profile)
    network = resolve_network(args.network_util)
    workload = Workload(seq_len=args.seq_len)
    model = resolve_model(args.model)
    candidates = plan(model, gpus, args.slo_ms, catalog=catalog, profile=profile, top=args.top,
                      network=network, workload=workload, max_micro_batches=args.max_micro_batches)
    baselines = by_cost_efficiency(colocated_baseline(model, [catalog[g] for g in gpus], args.slo_ms,
                                                      network=network, workload=workload))
    rows = [_row(str(i + 1), c) for i, c in enumerate(candidates)]
    if baselines:
        rows.append(_row("base", baselines[0]))
    print(f"{args.model} on {', '.join(gpus)}, TPOT <= {args.slo_ms:g} ms, {workload.seq_len} tokens of context")
    print(format_table(rows))
    best = candidates[0]
    if baselines:
        gain = best.prediction.tokens_per_s_per_cost / baselines[0].prediction.tokens_per_s_per_cost
        print(f"best plan vs the best colocated TP/EP baseline (row 'base'): {gain:.2f}x tokens/s per cost")
    else:
        print("no colocated TP/EP baseline fits these GPUs under this SLO")
    print(f"cost unit: {catalog.price_unit}. These are model predictions ({best.prediction.source} "
          "coefficients), not measurements.")
    if args.out:
        best.plan.save(args.out)
        print(f"wrote plan #1 to {args.out}")
    if args.plot:
        from msjax.planner.plots import plot_hardware_choices
        everything = search(model, [catalog[g] for g in dict.fromkeys(gpus)], args.slo_ms, profile=profile,
                            network=network, workload=workload, max_micro_batches=args.max_micro_batches)
        plot_hardware_choices(everything, baselines, args.plot, title=f"{args.model}, TPOT <= {args.slo_ms:g} ms",
                              price_unit=catalog.price_unit)
        print(f"wrote plot to {args.plot}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plan", help="search disaggregated deployment plans (paper §4) with the performance model",
        description="Search tp_a, tp_e, attention nodes, micro-batches and batch size for every (attention GPU, "
                    "expert GPU) pair; rank by predicted decode throughput per unit cost under a TPOT SLO.")
    parser.add_argument("--model", required=True, help="preset name or HF checkpoint directory")
    parser.add_argument("--gpus", required=True, help="comma-separated catalog names, e.g. H20,L40S")
    parser.add_argument("--slo-ms", type=float, default=150.0, help="time-per-output-token SLO (default 150)")
    parser.add_argument("--catalog", help="TOML file that overrides or adds GPU entries and prices")
    parser.add_argument("--profile", help="TOML/JSON file of measured T_a(b_a), T_e(b_e) points")
    parser.add_argument("--network-util", help="CSV of (bytes, utilisation) pairs for the M2N network")
    parser.add_argument("--seq-len", type=int, default=Workload().seq_len,
                        help=f"average context of a decoding sequence (default {Workload().seq_len})")
    parser.add_argument("--max-micro-batches", type=int, default=MAX_MICRO_BATCHES, help="N_m (default 4)")
    parser.add_argument("--top", type=int, default=10, help="plans to print (default 10)")
    parser.add_argument("--out", help="write the best plan here (DeploymentPlan TOML)")
    parser.add_argument("--plot", help="write a PNG of the best plan per GPU pairing vs the colocated baseline")
    parser.set_defaults(run=run)
    return parser
