"""The plan `msjax serve` picks for the machine it finds (msjax.planner.local): device-free, on stand-in devices."""

import types

import pytest

from msjax import ConfigError
from msjax.models.presets import preset_config
from msjax.planner.catalog import default_catalog
from msjax.planner.local import catalog_gpu_name, choose_plan


def devices(kind: str, count: int, platform: str = "gpu"):
    return [types.SimpleNamespace(platform=platform, device_kind=kind)] * count


@pytest.mark.parametrize("kind,name", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H200", "H200"), ("NVIDIA H20", "H20"),
    ("NVIDIA L40S", "L40S"), ("NVIDIA A100-SXM4-80GB", "A100"), ("Tesla T4", None),
])
def test_device_kind_names_its_catalog_entry(kind, name):
    assert catalog_gpu_name(kind, default_catalog().names) == name


def test_cpu_only_is_colocated_with_a_reason():
    choice = choose_plan(preset_config("tiny-moe"), devices("cpu", 8, platform="cpu"))
    assert choice.plan is None and "CPU only" in choice.reason and "--plan disaggregated" in choice.reason
    assert choice.describe() == "colocated (one device, one program)"


def test_unknown_gpu_falls_back_to_one_device_and_says_so():
    choice = choose_plan(preset_config("tiny-moe"), devices("Tesla T4", 4))
    assert choice.plan is None and "Tesla T4" in choice.reason and "catalog" in choice.reason


@pytest.mark.parametrize("name,count", [("tiny-moe", 1), ("mixtral-8x7b", 2), ("mixtral-8x7b", 8)])
def test_gpu_plan_fits_the_devices_at_hand(name, count):
    model = preset_config(name)
    choice = choose_plan(model, devices("NVIDIA H100 80GB HBM3", count))
    assert choice.plan is not None and choice.plan.num_devices <= count
    choice.plan.validate(model, count)
    assert f"{count}x H100" in choice.reason and "tok/s" in choice.reason


def test_model_that_fits_nowhere_here_is_colocated_with_the_reason():
    # Mixtral-8x7B (~93 GB in bf16) does not fit one H100 (80 GB): no plan fits, and the reason says so
    choice = choose_plan(preset_config("mixtral-8x7b"), devices("NVIDIA H100 80GB HBM3", 1))
    assert choice.plan is None and "fits 1x H100" in choice.reason


def test_no_devices_is_an_error():
    with pytest.raises(ConfigError) as err:
        choose_plan(preset_config("tiny-moe"), [])
    assert err.value.field == "plan"
