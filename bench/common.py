"""Shared helpers for the benchmarks: naming the hardware and writing dated result tables."""

from __future__ import annotations

import datetime
import json
import platform
import re
import sys
from pathlib import Path

import jax

RESULTS = Path(__file__).parent / "results"


def hardware_name() -> str:
    """The accelerator's name, or the CPU model and core count on a CPU-only machine."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return f"{len(jax.devices())}x {device.device_kind}"
    model = platform.processor() or "cpu"
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
        cores = len(re.findall(r"^processor\s*:", text, re.M))
    except (OSError, AttributeError):
        cores = 0
    return f"{model} ({cores} cores)"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48]


def write_results(bench: str, rows: list[dict], columns: list[tuple[str, str]], notes: str) -> Path:
    """Write `<bench>-<hardware>-<date>.md` (a table) and `.json` (the rows) under bench/results/."""
    hardware = hardware_name()
    date = datetime.date.today().isoformat()
    stem = RESULTS / f"{bench}-{slug(hardware)}-{date}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", *sys.argv])
    header = "| " + " | ".join(title for _, title in columns) + " |"
    lines = [f"# {bench}: {hardware}, {date}", "", f"Command: `{command}`", "",
             f"jax {jax.__version__}, backend {jax.default_backend()}.", "", notes, "", header,
             "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[key]) for key, _ in columns) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(
        {"bench": bench, "hardware": hardware, "date": date, "command": command, "rows": rows}, indent=1) + "\n")
    return stem.with_suffix(".md")
