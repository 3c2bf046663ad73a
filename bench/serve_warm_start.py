"""Warm start of `msjax serve`: how long a new user's first requests take, warmed up or not, and a restart.

    .venv/bin/python -m bench.serve_warm_start                  # the default plan: cold, cached, off
    .venv/bin/python -m bench.serve_warm_start --plan colocated --settings cold,off

In one run, up to three starts of `msjax serve` as a separate process: warmed up with an empty compilation cache
(`cold`), warmed up again with the cache the cold start filled (`cached`: a restart), and `--no-warmup` without a
cache (`off`). For each: the time until it printed its banner (it prints it once ready), the latency of the
first and of the tenth of ten completions sent one at a time, then `--bursts` identical bursts of
`--burst-requests` streaming requests from `--clients` concurrent clients (prompts cut from the Zen of Python at
varying lengths, varying max_tokens, some with logprobs: the mixes a server meets), each burst's wall time.
Warmed up, the first request is as fast as the tenth and the first burst as fast as the second. Results:
bench/results/serve-warm-start-<hardware>-<date>.md/.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import io
import json
import os
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_load import _zen, start_server  # noqa: E402

SETTINGS = {  # name -> (warm up?, use the run's cache directory?)
    "cold": (True, True), "cached": (True, True), "off": (False, False)}


def complete(address: str, body: dict, timeout: float) -> float:
    """Seconds until the whole (streamed) completion arrived; raises on an error status."""
    url = urllib.parse.urlparse(address)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    started = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
    finally:
        conn.close()
    return time.perf_counter() - started


def burst_bodies(n: int, text: str) -> list[dict]:
    """`n` requests: prompts of 5..~260 characters, 4..36 tokens out, every fifth with logprobs."""
    bodies = []
    for i in range(n):
        start, length = (37 * i) % 300, 5 + (53 * i) % 256
        body = {"prompt": text[start:start + length], "max_tokens": 4 + (7 * i) % 33, "temperature": 0,
                "ignore_eos": True, "stream": True}
        if i % 5 == 4:
            body["logprobs"] = 2
        bodies.append(body)
    return bodies


def measure(args, setting: str, cache_dir: str, text: str) -> dict:
    warmup, cached = SETTINGS[setting]
    started = time.perf_counter()
    proc, _, http_address = start_server(args, warmup=warmup,
                                         extra=("--compile-cache", cache_dir if cached else "none"))
    ready_s = time.perf_counter() - started
    try:
        single = {"prompt": "Beautiful is better than", "max_tokens": 16, "temperature": 0}
        latencies = [complete(http_address, single, args.timeout) for _ in range(10)]
        bodies = burst_bodies(args.burst_requests, text)
        bursts = []
        for _ in range(args.bursts):
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(lambda b: complete(http_address, b, args.timeout), bodies))
            bursts.append(time.perf_counter() - t0)
    finally:
        proc.terminate()
        proc.wait(60)
    row = {"setting": setting, "ready_s": round(ready_s, 1), "first_ms": round(1000 * latencies[0]),
           "tenth_ms": round(1000 * latencies[9]), "first_over_tenth": f"{latencies[0] / latencies[9]:.2f}"}
    for i, b in enumerate(bursts, 1):
        row[f"burst{i}_s"] = round(b, 2)
    row["burst1_over_last"] = f"{bursts[0] / bursts[-1]:.2f}"
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", help="plan for the server (default: msjax serve's default)")
    parser.add_argument("--config", help="ServeConfig TOML for the server")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--burst-requests", type=int, default=64)
    parser.add_argument("--bursts", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--settings", default="cold,cached,off", help=f"starts to run, in order, of {list(SETTINGS)}")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    settings = args.settings.split(",")
    if unknown := [s for s in settings if s not in SETTINGS]:
        parser.error(f"--settings: unknown {unknown}; known: {list(SETTINGS)}")
    with contextlib.redirect_stdout(io.StringIO()):
        text = _zen()
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:  # empty at the first start
        for setting in settings:
            row = measure(args, setting, cache_dir, text)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if not args.no_write:
        from bench.common import write_results
        columns = [("setting", "start"), ("ready_s", "start to ready s"), ("first_ms", "1st request ms"),
                   ("tenth_ms", "10th request ms"), ("first_over_tenth", "1st / 10th")]
        columns += [(f"burst{i}_s", f"burst {i} s") for i in range(1, args.bursts + 1)]
        columns += [("burst1_over_last", "burst 1 / last")]
        plan = args.plan or "default (tiny-moe, 2 attention nodes x 2 devices + 4 expert nodes, m = 2, 8 host devices)"
        notes = (f"Server: `msjax serve`, plan {plan}, a separate process started fresh for each row: cold = "
                 "warm-up with an empty compilation cache, cached = warm-up again with the cache the cold start "
                 "filled (a restart), off = `--no-warmup --compile-cache none`. 'start to ready' runs from "
                 "launching the process to its banner (printed when it reports ready). Requests: one "
                 "`/v1/completions` of 16 greedy tokens at a time (the 1st and the 10th after ready), then "
                 f"{args.bursts} identical bursts of {args.burst_requests} streaming requests from {args.clients} "
                 "concurrent clients (prompts of 5 to 260 characters, 4 to 36 tokens out, every fifth with "
                 f"logprobs). 1-minute load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
                 "end (2 cores).")
        print(f"wrote {write_results('serve-warm-start', rows, columns, notes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
