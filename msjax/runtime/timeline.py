"""Device timelines of the ping-pong pipeline: when each node's programs (one per layer, every micro-batch of the
step inside: `msjax.runtime.layer_programs`) really ran.

Times come from the JAX profiler's trace of device execution, not from host dispatch (which returns long
before the device finishes). The runner logs each launch in order; the profiler logs each execution with its
device and HLO module; per (device, module) the k-th execution is the k-th launch.

Output: Perfetto / Chrome trace JSON (open in ui.perfetto.dev or chrome://tracing), a PNG plot, and each
group's busy fraction (the share of the traced window in which at least one of its nodes was executing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
from collections import defaultdict
from pathlib import Path

import jax


@dataclasses.dataclass(frozen=True)
class Launch:
    program: str  # jitted function name, e.g. "attention_layer"
    group: str  # "attention" or "experts"
    node: int
    layer: int
    micro_batch: int  # -1: the program runs every micro-batch of the step
    device: int  # ordinal of the node's first device


@dataclasses.dataclass(frozen=True)
class Span:
    launch: Launch
    start_us: float
    end_us: float


class Timeline:
    def __init__(self):
        self.launches: list[Launch] = []
        self.spans: list[Span] = []
        self.marks: list[tuple[int, str]] = []  # (launches before it, text): events such as a lost node

    def mark(self, text: str) -> None:
        """An event between launches (an expert node lost, the step re-routed), shown as an instant at the start
        of the next traced program."""
        self.marks.append((len(self.launches), text))

    def launch(self, program: str, group: str, node: int, layer: int, micro_batch: int, mesh) -> None:
        device = mesh.devices.flat[0]
        self.launches.append(Launch(program, group, node, layer, micro_batch, device.local_hardware_id))

    @contextlib.contextmanager
    def trace(self, log_dir: str | Path):
        """Profile the enclosed steps and match device executions to the launches made meanwhile."""
        log_dir = Path(log_dir)
        before = len(self.launches)
        with jax.profiler.trace(str(log_dir), create_perfetto_trace=True):
            yield self
        traces = sorted(log_dir.glob("plugins/profile/*/perfetto_trace.json.gz"))
        if not traces:
            raise RuntimeError(f"the profiler wrote no perfetto trace under {log_dir}")
        self.spans += match(self.launches[before:], read_executions(traces[-1]))

    def busy_fraction(self) -> dict[str, float]:
        """Per group: time with at least one of its nodes executing, over the whole traced window."""
        if not self.spans:
            return {}
        start = min(s.start_us for s in self.spans)
        end = max(s.end_us for s in self.spans)
        out = {}
        for group in sorted({s.launch.group for s in self.spans}):
            intervals = sorted((s.start_us, s.end_us) for s in self.spans if s.launch.group == group)
            busy, cur_start, cur_end = 0.0, *intervals[0]
            for a, b in intervals[1:]:
                if a > cur_end:
                    busy += cur_end - cur_start
                    cur_start, cur_end = a, b
                else:
                    cur_end = max(cur_end, b)
            busy += cur_end - cur_start
            out[group] = busy / max(end - start, 1e-9)
        return out

    def to_chrome_trace(self) -> dict:
        groups = sorted({s.launch.group for s in self.spans})
        events = []
        for pid, group in enumerate(groups):
            events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"{group} nodes"}})
        for s in self.spans:
            pid = groups.index(s.launch.group)
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": s.launch.node,
                           "args": {"name": f"{s.launch.group} node {s.launch.node}"}})
            events.append({"ph": "X", "pid": pid, "tid": s.launch.node, "ts": s.start_us,
                           "dur": s.end_us - s.start_us,
                           "name": f"{s.launch.program} L{s.launch.layer}"
                                   + (f" mb{s.launch.micro_batch}" if s.launch.micro_batch >= 0 else ""),
                           "args": dataclasses.asdict(s.launch)})
        starts = {id(s.launch): s.start_us for s in self.spans}
        end = max((s.end_us for s in self.spans), default=0.0)
        for before, text in self.marks:
            ts = next((starts[id(launch)] for launch in self.launches[before:] if id(launch) in starts), end)
            events.append({"ph": "i", "s": "g", "pid": 0, "tid": 0, "ts": ts, "name": text})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def save(self, out_dir: str | Path, title: str = "") -> dict[str, Path]:
        """Write timeline.json (Chrome/Perfetto) and, when matplotlib is installed, timeline.png."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"json": out_dir / "timeline.json"}
        paths["json"].write_text(json.dumps(self.to_chrome_trace()))
        try:
            paths["png"] = self.plot(out_dir / "timeline.png", title)
        except ImportError:
            pass
        return paths

    def plot(self, path: Path, title: str = "") -> Path:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        rows = sorted({(s.launch.group, s.launch.node) for s in self.spans})
        t0 = min(s.start_us for s in self.spans)
        fig, ax = plt.subplots(figsize=(12, 0.5 * len(rows) + 1.5))
        colors = plt.get_cmap("tab10")
        for s in self.spans:
            y = rows.index((s.launch.group, s.launch.node))
            colour = s.launch.micro_batch if s.launch.micro_batch >= 0 else s.launch.layer
            ax.barh(y, (s.end_us - s.start_us) / 1e3, left=(s.start_us - t0) / 1e3, height=0.8,
                    color=colors(colour % 10), edgecolor="black", linewidth=0.3)
        ax.set_yticks(range(len(rows)), [f"{g} {n}" for g, n in rows])
        ax.invert_yaxis()
        per_layer = all(sp.launch.micro_batch < 0 for sp in self.spans)
        ax.set_xlabel(f"ms (device execution; colour = {'layer' if per_layer else 'micro-batch'})")
        busy = ", ".join(f"{g} busy {f:.0%}" for g, f in self.busy_fraction().items())
        ax.set_title(f"{title}  {busy}".strip())
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def read_trace_events(path: Path) -> list[dict]:
    """The events of a profiler trace file (.json.gz, either of the two layouts JAX writes)."""
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def read_executions(path: Path) -> dict[tuple[int, str], list[tuple[float, float]]]:
    """(device ordinal, HLO module) -> [(start_us, end_us)] of each execution, in start order."""
    return executions(read_trace_events(path))


def executions(events: list[dict]) -> dict[tuple[int, str], list[tuple[float, float]]]:
    """`read_executions` of events already read."""
    runs: dict[tuple[int, str, str], list[float]] = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") != "X" or "hlo_module" not in args or "run_id" not in args:
            continue
        key = (int(args.get("device_ordinal", -1)), args["hlo_module"], args["run_id"])
        start, end = float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))
        if key in runs:
            runs[key] = [min(runs[key][0], start), max(runs[key][1], end)]
        else:
            runs[key] = [start, end]
    out: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)
    for (device, module, _), (start, end) in runs.items():
        out[device, module].append((start, end))
    for spans in out.values():
        spans.sort()
    return out


def match(launches: list[Launch], executions: dict[tuple[int, str], list[tuple[float, float]]]) -> list[Span]:
    by_key: dict[tuple[int, str], list[Launch]] = defaultdict(list)
    for launch in launches:
        by_key[launch.device, f"jit_{launch.program}"].append(launch)
    spans = []
    for key, ordered in by_key.items():
        found = executions.get(key, [])
        if len(found) != len(ordered):
            raise RuntimeError(f"{key}: {len(ordered)} launches but the trace shows {len(found)} executions")
        spans += [Span(launch, start, end) for launch, (start, end) in zip(ordered, found)]
    return sorted(spans, key=lambda s: s.start_us)
