"""Network bandwidth utilisation as a function of message size: Util(bytes) of the paper's Eq. 6.

Small M2N transfers pay a fixed per-transfer latency, so they reach only a fraction of the link's line rate.
The curve is a file of (bytes, utilisation) pairs, CSV with a `bytes,utilization` header and `#` comments;
the shipped default (`default_network_utilization.csv`) is a documented latency-bandwidth model, not a
measurement.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from msjax.errors import ConfigError

DEFAULT_CURVE_PATH = Path(__file__).with_name("default_network_utilization.csv")


@dataclasses.dataclass(frozen=True)
class NetworkUtilization:
    """Fraction of line rate reached by a transfer of a given size; log-linear between points, clamped outside."""

    message_bytes: tuple[float, ...]  # strictly increasing
    utilization: tuple[float, ...]  # each in (0, 1]
    source: str = "default"  # where the points came from, for reports

    def __post_init__(self):
        if len(self.message_bytes) != len(self.utilization) or not self.message_bytes:
            raise ConfigError("network_utilization", f"{self.source}: needs matching, non-empty columns of bytes "
                              "and utilization")
        if any(not (b > 0 and math.isfinite(b)) for b in self.message_bytes):
            raise ConfigError("network_utilization", f"{self.source}: message sizes must be positive numbers")
        if any(b2 <= b1 for b1, b2 in zip(self.message_bytes, self.message_bytes[1:])):
            raise ConfigError("network_utilization", f"{self.source}: message sizes must strictly increase")
        if any(not 0 < u <= 1 for u in self.utilization):
            raise ConfigError("network_utilization", f"{self.source}: utilisation values must lie in (0, 1]")

    def __call__(self, message_bytes: float) -> float:
        x = math.log(max(message_bytes, 1.0))
        return float(np.interp(x, np.log(self.message_bytes), self.utilization))

    def transfer_time(self, message_bytes: float, bytes_per_s: float) -> float:
        """Seconds to move `message_bytes` over a link of `bytes_per_s` line rate."""
        if message_bytes <= 0:
            return 0.0
        return message_bytes / (bytes_per_s * self(message_bytes))


def load_utilization(path: str | Path | None = None) -> NetworkUtilization:
    """The curve in a CSV file of `bytes,utilization` rows; the shipped default when `path` is None."""
    path = DEFAULT_CURVE_PATH if path is None else Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError("network_utilization", f"cannot read {path}: {err.strerror}") from None
    rows = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    rows = [row for row in rows if row]
    if rows and not rows[0][0].isdigit():
        rows = rows[1:]  # header
    sizes, utils = [], []
    for number, row in enumerate(rows, 1):
        cells = [c.strip() for c in row.split(",")]
        try:
            size, util = (float(c) for c in cells)
        except ValueError:
            raise ConfigError("network_utilization", f"{path}: data row {number} {row!r} is not "
                              "'bytes,utilization'") from None
        sizes.append(size)
        utils.append(util)
    return NetworkUtilization(tuple(sizes), tuple(utils), source=str(path) if path != DEFAULT_CURVE_PATH
                              else "default")
