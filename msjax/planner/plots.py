"""Plots of planner results (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

from pathlib import Path

from msjax.errors import ConfigError
from msjax.planner.search import Candidate


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plot", "plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def best_by_hardware(candidates: list[Candidate]) -> dict[str, Candidate]:
    """The cheapest-per-token candidate of each (attention GPU, expert GPU) pair, or each colocated GPU."""
    best: dict[str, Candidate] = {}
    for c in candidates:
        p = c.plan
        key = f"{p.attention_gpu} colocated" if p.is_colocated else f"{p.attention_gpu} attn + {p.expert_gpu} exp"
        if key not in best or c.prediction.tokens_per_s_per_cost > best[key].prediction.tokens_per_s_per_cost:
            best[key] = c
    return best


def plot_hardware_choices(candidates: list[Candidate], baselines: list[Candidate], path: str | Path, *,
                          title: str, price_unit: str) -> None:
    """Bars: best predicted tokens/s per unit cost of each GPU pairing, colocated baselines in grey."""
    plt = _pyplot()
    rows = sorted(best_by_hardware(candidates).items(), key=lambda kv: kv[1].prediction.tokens_per_s_per_cost)
    rows += sorted(best_by_hardware(baselines).items(), key=lambda kv: kv[1].prediction.tokens_per_s_per_cost)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.5))
    labels = [name for name, _ in rows]
    values = [c.prediction.tokens_per_s_per_cost for _, c in rows]
    colors = ["0.6" if c.plan.is_colocated else "tab:blue" for _, c in rows]
    ax.barh(labels, values, color=colors)
    for y, (_, c) in enumerate(rows):
        ax.text(c.prediction.tokens_per_s_per_cost, y, f" {c.prediction.tokens_per_s_per_cost:.0f}", va="center",
                fontsize=8)
    ax.set_xlabel(f"decode tokens/s per unit cost ({price_unit})", fontsize=8)
    ax.set_title(f"{title}\n(model predictions, not measurements)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_dp_sweep(points: list[tuple[int, Candidate]], path: str | Path, *, title: str) -> None:
    """Figure 13 of the paper from the model: TPOT and per-GPU throughput against the attention DP degree."""
    plt = _pyplot()
    dp = [n for n, _ in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(dp, [c.prediction.tpot_ms for _, c in points], "o-")
    left.set_xlabel("attention nodes (DP degree)")
    left.set_ylabel("TPOT (ms)")
    left.set_ylim(bottom=0)
    left.set_title("(a) time per output token", fontsize=9)
    right.plot(dp, [c.prediction.tokens_per_s_per_gpu for _, c in points], "o-", color="tab:green")
    right.set_xlabel("attention nodes (DP degree)")
    right.set_ylabel("tokens/s per GPU")
    right.set_ylim(bottom=0)
    right.set_title("(b) decode throughput per GPU", fontsize=9)
    balanced = min(points, key=lambda p: abs(p[1].prediction.t_a_ms - p[1].prediction.t_e_ms))[0]
    for ax in (left, right):
        ax.axvline(balanced, color="0.7", linestyle=":", label="T_a ≈ T_e")
        ax.set_xticks(dp)
    right.legend(fontsize=8)
    fig.suptitle(f"{title} (model predictions, not measurements)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
