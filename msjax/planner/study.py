"""Regenerates docs/planner-study.md and its plots from the performance model:

    python -m msjax.planner.study [--out-dir docs]

Every number it writes is a model prediction from roofline coefficients (catalog spec sheets times the
efficiencies in `Assumptions`), not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from msjax.balance import contiguous_placement, imbalance, node_loads, place_experts, zipf_tokens
from msjax.planner.catalog import default_catalog
from msjax.planner.colocated import colocated_baseline
from msjax.planner.model import (Assumptions, DisaggregatedModel, Workload, attention_roofline,
                                 balanced_attention_nodes, expert_roofline)
from msjax.planner.plots import plot_dp_sweep, plot_hardware_choices
from msjax.planner.search import Candidate, by_cost_efficiency, resolve_model, search
from msjax.planner.utilization import load_utilization

SLO_MS = 150.0  # the paper's TPOT requirement (§7.1)
MODELS = ("mixtral-8x22b", "dbrx", "scaled-moe")
CLUSTERS = (("A800",), ("H800",), ("H20", "L40S"))
DP_DEGREES = (1, 2, 4, 6, 8, 10, 12, 16, 24)


def _best(candidates: list[Candidate]) -> Candidate:
    return by_cost_efficiency(candidates)[0]


def dp_sweep(model_name: str = "dbrx", gpu_name: str = "A800", attention_tp: int = 1, micro_batches: int = 3):
    """Figure 13 from the model: the best m = 3 plan with the given tp_a fixes tp_e and b_a; then n_a varies."""
    catalog, network = default_catalog(), load_utilization()
    model, gpu = resolve_model(model_name), catalog[gpu_name]
    chosen = _best([c for c in search(model, [gpu], SLO_MS, network=network)
                    if c.plan.micro_batches == micro_batches and c.plan.attention_tp == attention_tp])
    tp_e, b_a = chosen.plan.expert_tp, chosen.prediction.micro_batch
    setup = DisaggregatedModel(model, gpu, gpu, attention_tp, tp_e, attention_roofline(model, gpu, attention_tp),
                               expert_roofline(model, gpu, tp_e), network)
    points = []
    for n_a in DP_DEGREES:
        prediction = setup.predict(n_a, micro_batches, b_a)
        points.append((n_a, Candidate(dataclasses.replace(chosen.plan, attention_nodes=n_a,
                                                          max_batch=prediction.batch), prediction)))
    return chosen, points, balanced_attention_nodes(setup.attention, setup.expert, model)


def balance_rows(num_experts=32, top_k=4, num_nodes=8, num_tokens=8192, alphas=(0.8, 1.2),
                 budgets=(0, 2, 4, 8, 16), min_cost=0.0):
    rows = []
    for alpha in alphas:
        tokens = zipf_tokens(num_experts, top_k, num_tokens, alpha)
        before = imbalance(node_loads(tokens, contiguous_placement(num_experts, num_nodes), min_cost))
        after = [imbalance(node_loads(tokens, place_experts(tokens, num_nodes, redundancy=r, min_cost=min_cost),
                                      min_cost)) for r in budgets]
        rows.append((alpha, tokens.max() / tokens.mean(), before, after))
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_study(out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    catalog, network, assumptions, workload = default_catalog(), load_utilization(), Assumptions(), Workload()
    parts = [HEADER.format(slo=SLO_MS, seq=workload.seq_len, **dataclasses.asdict(assumptions))]

    # --- Figure 13 ---
    chosen, points, balance = dp_sweep()
    plot_dp_sweep(points, out_dir / "planner-dbrx-dp-sweep.png",
                  title=f"DBRX on A800: {chosen.plan.attention_tp}-GPU attention nodes, "
                        f"16x{chosen.plan.expert_tp} expert GPUs, m=3, b_a={chosen.prediction.micro_batch}")
    peak = max(points, key=lambda p: p[1].prediction.tokens_per_s_per_gpu)
    rows = [[str(n), f"{c.prediction.t_a_ms:.3f}", f"{c.prediction.t_e_ms:.3f}", f"{c.prediction.t_c_ms:.3f}",
             "yes" if c.prediction.hides_communication else "no", str(c.prediction.batch),
             f"{c.prediction.tpot_ms:.1f}", f"{c.prediction.tokens_per_s_per_gpu:,.0f}"] for n, c in points]
    parts.append(SWEEP.format(
        tp_a=chosen.plan.attention_tp, tp_e=chosen.plan.expert_tp, b_a=chosen.prediction.micro_batch,
        balance=balance, peak=peak[0], peak_tput=peak[1].prediction.tokens_per_s_per_gpu,
        table=_table(["n_a (DP)", "T_a ms", "T_e ms", "T_c ms", "Eq. 2-3 hold", "B", "TPOT ms", "tok/s/GPU"],
                     rows)))

    # --- plans vs colocated ---
    rows = []
    for cluster in CLUSTERS:
        gpus = [catalog[g] for g in cluster]
        for name in MODELS:
            model = resolve_model(name)
            found = search(model, gpus, SLO_MS, network=network)
            baselines = colocated_baseline(model, gpus, SLO_MS, network=network)
            if len(cluster) > 1:
                plot_hardware_choices(found, baselines, out_dir / f"planner-{name}-{'-'.join(cluster)}.png",
                                      title=f"{name} on {' + '.join(cluster)}, TPOT <= {SLO_MS:g} ms",
                                      price_unit=catalog.price_unit)
            best = _best(found).prediction
            per_gpu = max(b.prediction.tokens_per_s_per_gpu for b in baselines)
            per_cost = _best(baselines)
            rows.append([name, " + ".join(cluster), _best(found).describe(), str(best.batch),
                         f"{best.tpot_ms:.0f}", f"{best.tokens_per_s_per_gpu:,.0f}",
                         f"{best.tokens_per_s_per_cost:,.0f}", f"{per_gpu:,.0f}", per_cost.describe(),
                         f"{per_cost.prediction.tokens_per_s_per_cost:,.0f}",
                         f"{best.tokens_per_s_per_gpu / per_gpu:.2f}x",
                         f"{best.tokens_per_s_per_cost / per_cost.prediction.tokens_per_s_per_cost:.2f}x"])
    parts.append(PLANS.format(table=_table(
        ["model", "GPUs", "chosen plan", "B", "TPOT ms", "tok/s/GPU", "tok/s/cost", "colocated: best tok/s/GPU",
         "colocated: best per cost", "its tok/s/cost", "gain /GPU", "gain /cost"], rows)))

    # --- sensitivity: longer context ---
    rows = []
    for seq in (650, 2048, 8192):
        w = Workload(seq_len=seq)
        for name in MODELS:
            model = resolve_model(name)
            best = _best(search(model, [catalog["A800"]], SLO_MS, network=network, workload=w))
            base = max(colocated_baseline(model, [catalog["A800"]], SLO_MS, network=network, workload=w),
                       key=lambda c: c.prediction.tokens_per_s_per_gpu)
            rows.append([str(seq), name, best.describe(), f"{best.prediction.tokens_per_s_per_gpu:,.0f}",
                         base.describe(), f"{base.prediction.tokens_per_s_per_gpu:,.0f}",
                         f"{best.prediction.tokens_per_s_per_gpu / base.prediction.tokens_per_s_per_gpu:.2f}x"])
    parts.append(CONTEXT.format(table=_table(
        ["context s", "model", "chosen plan (A800)", "tok/s/GPU", "best colocated", "coloc. tok/s/GPU", "gain"],
        rows)))

    # --- sensitivity: prices and network ---
    model = resolve_model("dbrx")
    rows = []
    for label, cat in (("Table 3 prices", catalog), ("L40S at 3x its price", catalog.with_price("L40S", 3.24)),
                       ("H20 at 3x its price", catalog.with_price("H20", 5.55))):
        best = _best(search(model, [cat["H20"], cat["L40S"]], SLO_MS, network=network))
        rows.append([label, best.describe(), f"{best.prediction.tokens_per_s_per_cost:,.0f}"])
    prices = _table(["catalog", "chosen plan for DBRX on H20 + L40S", "tok/s/cost"], rows)
    rows = []
    for gbps in (400, 200, 100, 50):
        gpu = dataclasses.replace(catalog["A800"], network_gbps=gbps)
        best = _best(search(model, [gpu], SLO_MS, network=network))
        p = best.prediction
        rows.append([f"{gbps}", best.describe(), f"{p.t_c_ms / max(p.t_a_ms, p.t_e_ms):.2f}",
                     f"{p.tokens_per_s_per_gpu:,.0f}"])
    parts.append(SENSITIVITY.format(prices=prices, network=_table(
        ["NIC Gbps per GPU", "chosen plan for DBRX on A800", "T_c / T_f", "tok/s/GPU"], rows)))

    # --- load balancing ---
    budgets = (0, 2, 4, 8, 16)
    knee = round(catalog["L40S"].flops_per_s / catalog["L40S"].memory_bytes_per_s)
    rows = []
    for min_cost in (0.0, float(knee)):
        for alpha, skew, before, after in balance_rows(budgets=budgets, min_cost=min_cost):
            rows.append([f"{alpha}", f"{min_cost:.0f}", f"{skew:.2f}", f"{before:.3f}",
                         *[f"{a:.3f}" for a in after]])
    parts.append(BALANCE.format(knee=knee, table=_table(
        ["Zipf alpha", "K (tokens)", "hottest expert / mean", "contiguous, no replicas",
         *[f"greedy, {r} replicas" for r in budgets]], rows)))
    text = "\n".join(parts)
    (out_dir / "planner-study.md").write_text(text)
    return text


HEADER = """# Planner study: what the performance model predicts

Generated by `python -m msjax.planner.study` (msjax/planner/study.py); do not edit by hand.

**Every number on this page is a prediction of the msjax performance model with roofline coefficients, not a
measurement.** T_a = k1·b_a + k2 and T_e = k3·b_e + k4 come from the catalog's spec-sheet numbers at
{memory_efficiency:.0%} of memory bandwidth and {compute_efficiency:.0%} of dense bf16 peak, plus {overhead_us:g} us per
module per layer; {memory_fraction:.0%} of GPU memory holds weights and KV cache; the M2N network follows the
default utilisation curve (msjax/planner/default_network_utilization.csv, a latency-bandwidth model). The
workload is the paper's: bf16 everywhere, an average decoding context of {seq} tokens (median input 571 +
half the median output 159), TPOT SLO {slo:g} ms. Costs use Table 3's normalised purchase prices (L20 = 1).
Replace the roofline with measured profiles (`msjax plan --profile`) before trusting absolute numbers.

The colocated baseline is modelled with the same roofline: one server's GPUs run attention tensor-parallel
and the experts expert-parallel with an NVLink/PCIe all-to-all, nothing overlapped inside a layer, and models
or batches too large for one server add pipeline stages of whole servers. It has no kernel inefficiency at
small per-expert batches, no expert load imbalance and no pipeline bubbles, so it is an optimistic
TensorRT-LLM-like baseline, not vLLM.
"""

SWEEP = """
## Attention data parallelism (the paper's Figure 13, DBRX)

DBRX on A800: attention nodes of {tp_a} GPU(s), sixteen expert nodes of {tp_e} GPU(s), m = 3 and b_a = {b_a}
tokens per micro-batch per attention node held fixed (the best m = 3 plan with tp_a = {tp_a} under the SLO), while the
number of attention nodes n_a varies. The model's balance point n_a = k1·E / (k3·K) is {balance:.1f}.

![DBRX attention DP sweep](planner-dbrx-dp-sweep.png)

{table}

As in the paper, TPOT stays nearly flat while attention is the bottleneck (T_a > T_e; at n_a <= 4 the
pipeline's round trip T_a + T_e + 2 T_c sets the pace because m = 3 does not hide T_c there), then rises
linearly once the experts become the bottleneck. Per-GPU throughput grows almost linearly at first and peaks at
n_a = {peak} ({peak_tput:,.0f} tokens/s per GPU). The peak sits a little beyond the T_a = T_e point because the
expert nodes' fixed cost k4 (reading the weights) makes extra attention nodes cheap until T_e clearly exceeds
T_a; the paper reports the peak at DP 8 where T_a ≈ T_e.
"""

PLANS = """
## Chosen plans against the colocated baseline (TPOT <= 150 ms)

For each model and cluster, the plan that Algorithm 1 picks (best tokens/s per unit cost), and the best
colocated TP/EP deployments on the same GPU types under the same SLO. "gain /GPU" compares with the colocated
deployment of highest per-GPU throughput, "gain /cost" with the one of highest per-cost throughput (on H20 +
L40S the baseline runs on either type alone, as in the paper's Figure 9). B is the global batch, the plan
notation is nodes x GPUs per node x GPU type.

{table}

Plots of every GPU pairing on H20 + L40S: [Mixtral-8x22B](planner-mixtral-8x22b-H20-L40S.png),
[DBRX](planner-dbrx-H20-L40S.png), [Scaled-MoE](planner-scaled-moe-H20-L40S.png).

What the model says, and what it cannot say:

- **Heterogeneous deployment pays off.** On H20 + L40S the search puts attention on H20 (memory bandwidth and
  capacity per cost) and experts on L40S (compute per cost), the choice of the paper's §4.3, and beats the best
  single-type colocated deployment per unit cost for all three models.
- **More experts per token, more gain.** Scaled-MoE (32 experts, top-4) gains the most on the homogeneous
  clusters: colocated, each expert sees only B·K/E of a batch that the SLO and the KV cache limit, so its
  GEMMs stay memory-bound; disaggregation aggregates many attention nodes' tokens per expert.
- **Near parity for 8- and 16-expert models on one GPU type.** With a roofline and a perfectly balanced,
  perfectly efficient colocated baseline, a server of eight 80 GB GPUs already reaches a per-expert batch past
  the roofline knee for Mixtral-8x22B and DBRX at a 650-token context, so disaggregation cannot gain much per
  GPU; ping-pong also costs latency (TPOT ≈ m·L·T_f), which caps b_e under the SLO. The paper's measured
  1.28x over TensorRT-LLM on these models comes from effects a roofline does not see (GEMM efficiency at
  small per-expert batches, expert imbalance, fused kernels, communication the baseline cannot hide); a
  measured profile puts them into the model. Longer contexts favour disaggregation (next section).
"""

CONTEXT = """
## Longer contexts (A800, per-GPU throughput)

The KV cache limits the colocated batch (all sequences' KV beside all weights on the same GPUs), while the
disaggregated plan adds attention nodes to hold more of it and keeps expert GEMMs large. In the model the
advantage of disaggregation grows with the context: from near parity at the paper's 650 tokens to a clear
gain for every model at 8192.

{table}
"""

SENSITIVITY = """
## Prices and network

Changing the catalog's prices changes the GPU types the search picks (the test suite checks the same):

{prices}

Slower NICs lengthen T_c; once T_c > T_f / 2 the plan needs m = 4 micro-batches (Eq. 3: m >= 2(1 + T_c / T_f)),
and below that the search trades batch size for hiding the transfers:

{network}
"""

BALANCE = """
## Expert load balancing (paper §6)

A synthetic routing trace: 8192 tokens, top-4 of 32 experts (Scaled-MoE's shape) with Zipf(alpha) expert
popularity in a random order, experts spread over 8 expert nodes. Each cell is max / mean of the nodes'
cost C_j = sum_i x_ij · max(a_i, K); K = 0 counts tokens only, K = {knee} is the L40S roofline knee (F / B):
an expert costs at least the time of reading its weights. "contiguous" is the default placement (four
experts per node, no replicas); the greedy columns are `msjax.balance.place_experts` with that many extra
replicas (each node reserves (32 + budget) / 8 expert slots).

{table}

Without replicas the greedy placement can only spread whole experts, and one hot expert alone can exceed the
mean node load; two to four replicas of the hottest experts, with their tokens split by the exact min-max
shares, bring the busiest node within a few percent of the mean. (`tests/test_balance.py` also checks the
greedy against a brute-force optimum on small cases, where it stays within 20%, usually exact.)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="docs", help="where planner-study.md and its plots go")
    args = parser.parse_args(argv)
    write_study(Path(args.out_dir))
    print(f"wrote {Path(args.out_dir) / 'planner-study.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
