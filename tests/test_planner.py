"""Planner: the paper's analytic results, the search (Algorithm 1), the catalog and profile files, the CLI.

Everything here is arithmetic on configs: no JAX compiles, no devices."""

import argparse
import dataclasses
import math

import pytest

from msjax.config import DeploymentPlan
from msjax.errors import ConfigError
from msjax.models.presets import TINY_MOE_DIR, preset_config
from msjax.planner import (Assumptions, GpuSpec, LinearCost, Workload, attention_roofline, balanced_attention_nodes,
                           colocated_baseline, compute_bound_batch, default_catalog, expert_roofline,
                           ffn_utilization, iteration_latency_bounds, load_catalog, load_profile, load_utilization,
                           min_micro_batches, plan, search, total_latency)
from msjax.planner.cli import add_parser
from msjax.planner.model import DisaggregatedModel, hides_communication

MIXTRAL = preset_config("mixtral-8x22b")
DBRX = preset_config("dbrx")
CATALOG = default_catalog()
NETWORK = load_utilization()


def _with_network(gpu: str, gbps: float) -> GpuSpec:
    return dataclasses.replace(CATALOG[gpu], network_gbps=gbps)


# --- the paper's analytic results ---

def test_a100_mixtral_example_of_section_2_3():
    """§2.3: 312 TFLOPS / 2 TB/s -> b >= 156; 156 x 2 / 8 = 39 tokens per expert; FFN MFU 2/8 = 25%."""
    a100_in_the_paper = dataclasses.replace(CATALOG["A100"], memory_bw_gbs=2000)
    assert compute_bound_batch(a100_in_the_paper) == pytest.approx(156)
    assert 156 * MIXTRAL.top_k / MIXTRAL.num_experts == 39
    assert ffn_utilization(156, MIXTRAL, a100_in_the_paper) == pytest.approx(0.25)
    assert ffn_utilization(4 * 156, MIXTRAL, a100_in_the_paper) == 1.0  # compute-bound from 624 tokens on
    dense = dataclasses.replace(MIXTRAL, num_experts=2, top_k=2)
    assert ffn_utilization(156, dense, a100_in_the_paper) == pytest.approx(1.0)  # dense: min(B/F·b, 1)
    assert compute_bound_batch(CATALOG["A100"]) == pytest.approx(153, abs=0.1)  # spec sheet: 2039 GB/s


@pytest.mark.parametrize("ratio, expected", [(0.1, 3), (0.3, 3), (0.49, 3), (0.5, 3), (0.51, 4), (0.9, 4)])
def test_min_micro_batches_3_for_fast_4_for_slow_networks(ratio, expected):
    """§4.1: m >= 2(1 + T_c/T_f): fast communication (T_c < T_f / 2) needs 3, slower needs 4."""
    assert min_micro_batches(ratio, 1.0) == expected
    assert hides_communication(1.0, 1.0, ratio, expected)
    assert not hides_communication(1.0, 1.0, ratio, expected - 1)


def test_search_uses_three_micro_batches_on_fast_and_four_on_slow_networks():
    fast = plan(DBRX, ["A800"], 150, catalog=CATALOG.with_entry(_with_network("A800", 400)), top=1)[0]
    slow = plan(DBRX, ["A800"], 150, catalog=CATALOG.with_entry(_with_network("A800", 100)), top=1)[0]
    for best, m in ((fast, 3), (slow, 4)):
        x = best.prediction
        assert best.plan.micro_batches == m
        assert m >= 2 * (1 + x.t_c_ms / max(x.t_a_ms, x.t_e_ms))
    assert fast.prediction.t_c_ms < max(fast.prediction.t_a_ms, fast.prediction.t_e_ms) / 2
    assert slow.prediction.t_c_ms > max(slow.prediction.t_a_ms, slow.prediction.t_e_ms) / 2


def test_balanced_attention_nodes_equalise_compute():
    """§4.2: n_a = k1·E / (k3·K) gives T_a = T_e (intercepts aside), since b_e = b_a·n_a·K / E."""
    attention, expert = LinearCost(3e-6, 0.0, "measured"), LinearCost(2e-6, 0.0, "measured")
    n_a = balanced_attention_nodes(attention, expert, DBRX)
    assert n_a == pytest.approx(3e-6 * 16 / (2e-6 * 4))
    b_a = 100
    assert attention(b_a) == pytest.approx(expert(b_a * n_a * DBRX.top_k / DBRX.num_experts))


def test_search_sets_attention_nodes_from_the_balance():
    gpu = CATALOG["A800"]
    for c in plan(DBRX, ["A800"], 150, top=5):
        p = c.plan
        balance = balanced_attention_nodes(attention_roofline(DBRX, gpu, p.attention_tp),
                                           expert_roofline(DBRX, gpu, p.expert_tp), DBRX)
        assert p.attention_nodes in {max(1, math.floor(balance)), math.ceil(balance)}


def test_latency_equations_4_and_5():
    t_a, t_e, t_c, m, layers = 1.0, 0.8, 0.3, 3, 10
    low, high = iteration_latency_bounds(t_a, t_e, t_c, m, layers)
    assert low == pytest.approx(2.4 + 3 * 1.0 * 9) and high == pytest.approx(30.0) and low <= high
    assert total_latency(t_a, t_e, t_c, m, layers) == pytest.approx(2.4 + 1.0 * (3 * 10 - 1))  # Eq. 5
    # constraint 3 broken (m = 2): each layer waits for the round trip instead of m·T_f
    assert total_latency(t_a, t_e, t_c, 2, layers) == pytest.approx(2.4 - 1.0 + 2.4 * 10)


def test_roofline_coefficients_follow_the_shapes():
    gpu = CATALOG["H20"]
    short, long = (attention_roofline(MIXTRAL, gpu, 1, Workload(seq_len=s)) for s in (650, 4096))
    assert long.slope > short.slope and long.intercept == short.intercept  # KV reads scale with context
    one, four = expert_roofline(MIXTRAL, gpu, 1), expert_roofline(MIXTRAL, gpu, 4)
    overhead = Assumptions().overhead_us * 1e-6
    assert (four.intercept - overhead) == pytest.approx((one.intercept - overhead) / 4)  # a quarter of the weights
    expected_k3 = 2 * 3 * 6144 * 16384 / (gpu.flops_per_s * Assumptions().compute_efficiency)
    assert one.slope == pytest.approx(expected_k3)
    assert one.source == short.source == "roofline"


def test_memory_limit_equation_8():
    gpu = CATALOG["A800"]
    setup = DisaggregatedModel(MIXTRAL, gpu, gpu, 2, 4, attention_roofline(MIXTRAL, gpu, 2),
                               expert_roofline(MIXTRAL, gpu, 4), NETWORK)
    b = setup.max_micro_batch(3)
    kv = 2 * 8 * 128 * 56 * 2 * 650  # bytes of one sequence's KV cache
    weights = 2 * (MIXTRAL.param_count() - 8 * 56 * 3 * 6144 * 16384)
    capacity = 2 * 80e9 * Assumptions().memory_fraction
    assert 3 * b * kv + weights <= capacity < 3 * (b + 1) * kv + weights


# --- the search ---

def test_plan_returns_sorted_valid_heterogeneous_plans(tmp_path):
    found = plan("mixtral-8x22b", ["H20", "L40S"], 150, top=4)
    assert len(found) == 4
    per_cost = [c.prediction.tokens_per_s_per_cost for c in found]
    assert per_cost == sorted(per_cost, reverse=True)
    for c in found:
        p, x = c.plan, c.prediction
        p.validate(MIXTRAL, p.num_devices)
        assert p.attention_gpu in ("H20", "L40S") and p.expert_gpu in ("H20", "L40S")
        assert x.tpot_ms <= 150 and x.hides_communication and x.source == "roofline"
        assert p.max_batch == x.batch == p.micro_batches * p.attention_nodes * x.micro_batch
        assert x.tokens_per_s_per_gpu == pytest.approx(x.batch / (x.tpot_ms / 1e3) / p.num_devices)
    best = found[0]
    assert (best.plan.attention_gpu, best.plan.expert_gpu) == ("H20", "L40S")  # §4.3's pairing
    best.plan.save(tmp_path / "plan.toml")
    assert DeploymentPlan.load(tmp_path / "plan.toml") == best.plan


def test_catalog_prices_change_the_chosen_gpus():
    def chosen(catalog):
        p = plan(DBRX, ["H20", "L40S"], 150, catalog=catalog, top=1)[0].plan
        return p.attention_gpu, p.expert_gpu

    assert chosen(CATALOG) == ("H20", "L40S")
    assert chosen(CATALOG.with_price("L40S", 3 * 1.08)) == ("H20", "H20")
    assert chosen(CATALOG.with_price("H20", 3 * 1.85)) == ("L40S", "L40S")


def test_larger_batches_are_searched_up_to_the_slo():
    best = plan(DBRX, ["A800"], 150, top=1)[0]
    tight = plan(DBRX, ["A800"], 60, top=1)[0]
    assert tight.prediction.tpot_ms <= 60
    assert tight.prediction.tokens_per_s_per_cost < best.prediction.tokens_per_s_per_cost


def test_impossible_slo_is_a_clear_error():
    with pytest.raises(ConfigError, match="TPOT of 1 ms") as err:
        plan(DBRX, ["A800", "H800"], 1)
    assert err.value.field == "slo_ms" and "needs" in str(err.value)


def test_model_that_fits_no_gpu_is_a_clear_error():
    huge = dataclasses.replace(preset_config("scaled-moe"), expert_ffn_size=8 * 65536)  # 1.2 TB per expert
    with pytest.raises(ConfigError, match="fits no GPU") as err:
        plan(huge, ["L40S", "L20"], 150)
    assert err.value.field == "gpus" and "GB" in str(err.value)


def test_network_too_slow_to_hide_communication_is_a_clear_error():
    with pytest.raises(ConfigError, match="hides communication") as err:
        plan(DBRX, ["A800"], 150, catalog=CATALOG.with_entry(_with_network("A800", 2)))
    assert err.value.field == "network"


@pytest.mark.parametrize("gpus, slo, field", [(["A800", "TPU"], 150, "gpus"), ([], 150, "gpus"),
                                              ("A800", 150, "gpus"), (["A800"], 0, "slo_ms"),
                                              (["A800"], -3, "slo_ms")])
def test_bad_requests_name_the_field(gpus, slo, field):
    with pytest.raises(ConfigError) as err:
        plan(DBRX, gpus, slo)
    assert err.value.field == field


def test_model_from_a_checkpoint_directory():
    found = plan(str(TINY_MOE_DIR), ["L20"], 20, top=1)
    assert found and found[0].plan.expert_nodes == preset_config("tiny-moe").num_experts


def test_colocated_baseline_respects_slo_and_memory():
    baselines = colocated_baseline(MIXTRAL, [CATALOG["A800"]], 150, network=NETWORK)
    assert baselines
    kv = 2 * 8 * 128 * 56 * 2 * 650  # bytes of one sequence's KV cache
    for c in baselines:
        x = c.prediction
        assert c.plan.is_colocated and x.tpot_ms <= 150 and c.plan.colocated_devices == x.num_gpus >= 4
        assert 2 * MIXTRAL.param_count() + x.batch * kv <= x.num_gpus * 80e9 * Assumptions().memory_fraction
    assert colocated_baseline(MIXTRAL, [CATALOG["A800"]], 1, network=NETWORK) == []


# --- files: catalog, profile, network curve ---

def test_default_catalog_holds_table_3():
    table3 = {"L20": (1.00, 48, 864, 119.5), "H800": (5.28, 80, 3430.4, 989), "A800": (2.26, 80, 2039, 312),
              "H20": (1.85, 96, 4096, 148), "L40S": (1.08, 48, 864, 362)}
    for name, (price, memory, bandwidth, tflops) in table3.items():
        gpu = CATALOG[name]
        assert (gpu.price, gpu.memory_gb, gpu.memory_bw_gbs, gpu.bf16_tflops) == (price, memory, bandwidth, tflops)
    assert {"H100", "H200", "A100", "B200"} <= set(CATALOG.names)


def test_catalog_file_overrides_and_adds(tmp_path):
    path = tmp_path / "catalog.toml"
    path.write_text('price_unit = "USD per GPU-hour"\n[gpu.H20]\nprice = 1.5\n'
                    "[gpu.X1]\nmemory_gb = 64\nmemory_bw_gbs = 3000\nbf16_tflops = 500\nnetwork_gbps = 200\n"
                    "intra_node_gbs = 400\nprice = 2\ngpus_per_node = 4\n")
    catalog = load_catalog(path)
    assert catalog.price_unit == "USD per GPU-hour" and catalog["H20"].price == 1.5
    assert catalog["H20"].memory_gb == 96 and catalog["X1"].gpus_per_node == 4
    assert plan(DBRX, ["X1"], 150, catalog=path, top=1)[0].plan.attention_tp <= 4


@pytest.mark.parametrize("text, field, words", [
    ("[gpu.H20\nprice = 1", "catalog", "not valid TOML"),
    ("[gpu.H20]\nprise = 1.5\n", "gpu.H20.prise", "unknown field"),
    ("[gpu.H20]\nprice = -1\n", "gpu.H20.price", "positive"),
    ('[gpu.H20]\nprice = "cheap"\n', "gpu.H20.price", "positive"),
    ("[gpu.New]\nprice = 1\n", "gpu.New", "needs memory_gb"),
    ("[gpus.H20]\nprice = 1\n", "gpus", "unknown key"),
    ("gpu = 3\n", "gpu", "tables"),
])
def test_malformed_catalog_files_name_the_problem(tmp_path, text, field, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words) as err:
        load_catalog(path)
    assert err.value.field == field


def _profile_text(k1=4e-3, k2=0.3, k3=2e-3, k4=0.5) -> str:  # milliseconds
    batches = [16, 64, 256]
    return (f'[[attention]]\ngpu = "H20"\ntp = 2\nbatch = {batches}\n'
            f"time_ms = {[k1 * b + k2 for b in batches]}\n"
            f'[[expert]]\ngpu = "L40S"\ntp = 2\nbatch = {batches}\n'
            f"time_ms = {[k3 * b + k4 for b in batches]}\n")


def test_measured_profile_is_fitted_and_used(tmp_path):
    path = tmp_path / "profile.toml"
    path.write_text(_profile_text())
    profile = load_profile(path)
    attention = profile.cost("attention", "H20", 2)
    assert attention.slope == pytest.approx(4e-6) and attention.intercept == pytest.approx(3e-4)
    assert attention.source == "measured"
    found = plan(DBRX, ["H20", "L40S"], 150, profile=path, top=50)
    for c in found:  # a profiled (role, GPU) is searched only at its profiled tp
        if c.plan.attention_gpu == "H20":
            assert c.plan.attention_tp == 2
        if c.plan.expert_gpu == "L40S":
            assert c.plan.expert_tp == 2
    sources = {c.prediction.source for c in found}
    assert "measured" in sources and sources <= {"measured", "roofline", "attention: measured, expert: roofline",
                                                 "attention: roofline, expert: measured"}
    measured = next(c for c in found if c.prediction.source == "measured")
    assert measured.prediction.t_a_ms == pytest.approx(4e-3 * measured.prediction.micro_batch + 0.3)


def test_profile_fit_refits_through_origin_and_rejects_bad_files(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"expert": [{"gpu": "L40S", "tp": 1, "batch": [10, 20, 40], "time_ms": [0.09, 0.2, 0.41]}]}')
    cost = load_profile(path).cost("expert", "L40S", 1)
    assert cost.intercept == 0.0 and cost.slope > 0
    for text, words in [('{"expert": [{"gpu": "L40S", "tp": 1, "batch": [8, 8], "time_ms": [1, 1]}]}', "two different"),
                        ('{"expert": [{"gpu": "L40S", "tp": 1, "batch": [8, 16], "time_ms": [2, 1]}]}', "falls"),
                        ('{"expert": [{"gpu": "L40S", "batch": [8, 16], "time_ms": [1, 2]}]}', "missing tp"),
                        ('{"ffn": []}', "unknown role"), ("{", "not valid JSON")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=words):
            load_profile(path)


def test_network_utilization_curve(tmp_path):
    assert 0 < NETWORK(4096) < NETWORK(256 * 1024) < NETWORK(64 * 2**20) <= 1
    assert NETWORK(1) == NETWORK.utilization[0] and NETWORK(2**40) == NETWORK.utilization[-1]  # clamped
    path = tmp_path / "util.csv"
    path.write_text("bytes,utilization\n1000,0.5\n1000000,1.0\n")
    curve = load_utilization(path)
    assert curve(31623) == pytest.approx(0.75, abs=1e-3)  # halfway in log(bytes)
    assert curve.transfer_time(1e6, 1e9) == pytest.approx(1e-3)
    for text, words in [("bytes,utilization\n1000,0.5\n500,0.9\n", "increase"),
                        ("bytes,utilization\n1000,1.5\n", r"\(0, 1\]"), ("1000;0.5\n", "not 'bytes,utilization'")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=words) as err:
            load_utilization(path)
        assert err.value.field == "network_utilization"


# --- CLI ---

def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="msjax")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def test_cli_prints_a_table_and_writes_the_plan(tmp_path, capsys):
    out = tmp_path / "plan.toml"
    assert _cli(["plan", "--model", "dbrx", "--gpus", "H20,L40S", "--slo-ms", "150", "--top", "3",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "TPOT ms" in text and "tok/s/cost" in text and "base" in text and "not measurements" in text
    saved = DeploymentPlan.load(out)
    assert (saved.attention_gpu, saved.expert_gpu) == ("H20", "L40S")
    assert f"{saved.attention_nodes}x{saved.attention_tp}xH20" in text


def test_cli_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plans.png"
    assert _cli(["plan", "--model", "mixtral-8x22b", "--gpus", "H20,L40S", "--plot", str(png), "--top", "1"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="slo_ms"):
        _cli(["plan", "--model", "dbrx", "--gpus", "A800", "--slo-ms", "1"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[gpu.A800]\nprice = 0\n")
    with pytest.raises(ConfigError, match="gpu.A800.price"):
        _cli(["plan", "--model", "dbrx", "--gpus", "A800", "--catalog", str(bad)])


def test_too_few_micro_batches_is_rejected():
    with pytest.raises(ConfigError, match="Eq. 3") as err:
        plan(DBRX, ["A800"], 150, max_micro_batches=2)
    assert err.value.field == "max_micro_batches"


def test_search_returns_every_configuration_that_meets_the_slo():
    found = search(DBRX, [CATALOG["A800"]], 150, network=NETWORK)
    assert len({(c.plan.attention_tp, c.plan.expert_tp, c.plan.attention_nodes, c.plan.micro_batches)
                for c in found}) == len(found) > 10


def test_measured_costs_interpolate_and_hidden_heads():
    from msjax.planner.profiler import MeasuredCost, interpolate, predicted_step_seconds
    cost = MeasuredCost((16.0, 32.0, 64.0), (1.0, 2.0, 5.0))
    assert [cost(b) for b in (16, 24, 48, 64)] == [1.0, 1.5, 3.5, 5.0]  # through the points, not a fitted line
    assert cost(8) == 0.5 and cost(80) == 6.5  # the end segments carried on
    t_a, t_e, t_c, t_o = interpolate({"batch": [32, 16], "attention_s": [2.0, 1.0], "expert_s": [1.0, 0.5],
                                      "transfer_s": [0.1, 0.1], "step_fixed_s": [0.3, 0.2]})
    assert t_a(24) == 1.5 and t_o(32) == 0.3
    # overlapped: every micro-batch's head but the last hides behind the expert node's last layer (up to its
    # length); not overlapped: all of them count
    one = predicted_step_seconds(t_a, t_e, 2, 32, 1, overlap=True, t_c=t_c, t_o=t_o, t_host=0.5)
    two = predicted_step_seconds(t_a, t_e, 2, 32, 2, overlap=True, t_c=t_c, t_o=t_o, t_host=0.5)
    assert one == pytest.approx(2.0 + 1.0 + 0.2 + 2 * 3.2 - 2.0 + 0.3 + 0.5)
    assert two == pytest.approx(1.0 + 0.5 + 0.2 - 1.0 + 2 * 1.0 * 2 + 0.2 + 0.5)  # 2 heads, 1 hidden
    serial = predicted_step_seconds(t_a, t_e, 2, 32, 2, overlap=False, t_c=t_c, t_o=t_o, t_host=0.5)
    assert serial == pytest.approx(2 * 2 * (1.0 + 0.5 + 0.2) + 2 * 0.2 + 0.5)
