"""Measured T_a(b_a) and T_e(b_e): profiled times of one MoE layer for one micro-batch on one node, fitted
with least squares to the paper's linear model (§4.2: "k_i values can be obtained through profiling and
interpolation"). A profile is TOML or JSON:

    [[attention]]            # one entry per (GPU type, tensor-parallel size) that was profiled
    gpu = "H20"
    tp = 2
    batch = [16, 32, 64, 128]             # b_a: tokens in the micro-batch
    time_ms = [0.31, 0.36, 0.45, 0.63]    # one layer, attention + router, at the workload's sequence length

    [[expert]]
    gpu = "L40S"
    tp = 1
    batch = [64, 128, 256, 512]           # b_e: tokens reaching the expert
    time_ms = [0.52, 0.60, 0.79, 1.20]

Where a profile covers a (role, GPU type), the search uses only the tensor-parallel sizes it lists for them, so
measured and optimistic roofline numbers are never compared with each other for the same hardware.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import numpy as np

from msjax.errors import ConfigError
from msjax.planner.model import LinearCost

ROLES = ("attention", "expert")


def fit_linear(batch, time_s) -> LinearCost:
    """Least-squares slope and intercept; refitted through the origin if noise makes the intercept negative."""
    x, y = np.asarray(batch, float), np.asarray(time_s, float)
    slope, intercept = np.polyfit(x, y, 1)
    if intercept < 0:
        slope, intercept = float(x @ y / (x @ x)), 0.0
    return LinearCost(float(slope), float(intercept), "measured")


@dataclasses.dataclass(frozen=True)
class MeasuredProfile:
    """Fitted costs by (role, GPU name, tp)."""

    costs: tuple[tuple[tuple[str, str, int], LinearCost], ...]
    source: str = "profile"

    def cost(self, role: str, gpu: str, tp: int) -> LinearCost | None:
        return dict(self.costs).get((role, gpu, tp))

    def covers(self, role: str, gpu: str) -> bool:
        return any(r == role and g == gpu for (r, g, _), _cost in self.costs)


def parse_profile(data: dict, source: str = "profile") -> MeasuredProfile:
    if not isinstance(data, dict):
        raise ConfigError("profile", f"{source}: must be a table with [[attention]] and/or [[expert]] entries")
    unknown = sorted(set(data) - set(ROLES))
    if unknown:
        raise ConfigError(f"profile.{unknown[0]}", f"{source}: unknown role; expected attention and expert")
    costs = {}
    for role in ROLES:
        entries = data.get(role, [])
        if not isinstance(entries, list):
            raise ConfigError(f"profile.{role}", f"{source}: must be a list of entries ([[{role}]])")
        for number, entry in enumerate(entries):
            where = f"profile.{role}[{number}]"
            if not isinstance(entry, dict):
                raise ConfigError(where, f"{source}: must be a table with gpu, tp, batch, time_ms")
            missing = [k for k in ("gpu", "tp", "batch", "time_ms") if k not in entry]
            if missing:
                raise ConfigError(where, f"{source}: missing {', '.join(missing)}")
            gpu, tp, batch, time_ms = entry["gpu"], entry["tp"], entry["batch"], entry["time_ms"]
            if not isinstance(gpu, str):
                raise ConfigError(f"{where}.gpu", f"{source}: must be a GPU name, got {gpu!r}")
            if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
                raise ConfigError(f"{where}.tp", f"{source}: must be a positive integer, got {tp!r}")
            if not (isinstance(batch, list) and isinstance(time_ms, list) and len(batch) == len(time_ms)):
                raise ConfigError(where, f"{source}: batch and time_ms must be lists of equal length")
            try:
                x, y = np.asarray(batch, float), np.asarray(time_ms, float)
            except (TypeError, ValueError):
                raise ConfigError(where, f"{source}: batch and time_ms must hold numbers") from None
            if len(set(x.tolist())) < 2:
                raise ConfigError(where, f"{source}: needs at least two different batch sizes to fit a line")
            if (x <= 0).any() or (y <= 0).any():
                raise ConfigError(where, f"{source}: batch sizes and times must be positive")
            cost = fit_linear(x, y / 1e3)
            if cost.slope < 0:
                raise ConfigError(where, f"{source}: time falls as the batch grows (slope {cost.slope * 1e6:.3g} "
                                  "us/token); check the measurements")
            if (role, gpu, tp) in costs:
                raise ConfigError(where, f"{source}: a second entry for {role} on {gpu} with tp={tp}")
            costs[(role, gpu, tp)] = cost
    return MeasuredProfile(tuple(costs.items()), source)


def load_profile(path: str | Path) -> MeasuredProfile:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError("profile", f"cannot read {path}: {err.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError("profile", f"{path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'} "
                          f"({err})") from None
    return parse_profile(data, str(path))
