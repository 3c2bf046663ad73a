"""The `msjax` command line (also `python -m msjax`).

    msjax generate --model tiny-moe --prompt "Beautiful is better than" --max-tokens 40
    msjax serve                       # gRPC on 127.0.0.1:50051, OpenAI-compatible HTTP on 127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time


class ProgressBar:
    """A one-line progress bar on stderr (one final line when stderr is not a terminal): of bytes (weight
    loading, shown in MB) or of counted things (`unit`, e.g. the warm-up's step shapes)."""

    def __init__(self, label: str, width: int = 30, unit: str | None = None):
        self.label, self.width, self.unit, self._last = label, width, unit, -1
        self.interactive = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        percent = 100 * done // max(total, 1)
        if percent == self._last or (not self.interactive and done < total):
            return
        self._last = percent
        filled = self.width * percent // 100
        amount = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if self.unit is None else f"{done}/{total} {self.unit}"
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{' ' * (self.width - filled)}] {percent:3d}% {amount}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _generate(args: argparse.Namespace) -> int:
    from msjax.config import DeploymentPlan
    from msjax.engine.engine import Engine
    from msjax.engine.sampling_params import SamplingParams

    started = time.perf_counter()
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    plan = DeploymentPlan.load(args.plan) if args.plan else None
    if plan is not None and plan.num_devices > 1:
        from msjax.runtime.host_devices import ensure_host_devices
        ensure_host_devices()  # before anything starts JAX's backend
    engine = Engine.from_pretrained(args.model, plan=plan, dtype=args.dtype,
                                    progress=ProgressBar("loading weights"))
    timeline = None
    if args.trace:
        from msjax.runtime.timeline import Timeline
        timeline = Timeline()
        try:
            engine.runner.attach_timeline(timeline)
        except ValueError as err:
            print(f"error: --trace: {err}", file=sys.stderr)
            return 2
    prompt = args.prompt
    if engine.tokenizer is None:
        try:
            prompt = [int(t) for t in args.prompt.replace(",", " ").split()]
        except ValueError:
            print(f"error: {args.model} has no tokenizer, so --prompt must be token ids like '1 5 9'",
                  file=sys.stderr)
            return 2
    loaded = time.perf_counter()
    engine.add_request("cli", prompt, sampling)
    token_ids, text, reason = [], [], None
    if not args.json:
        print(args.prompt, end="", flush=True)
    with timeline.trace(f"{args.trace}/profile") if timeline else contextlib.nullcontext():
        for delta in _drain(engine):
            token_ids += delta.token_ids
            piece = delta.text if delta.text is not None else "".join(f" {t}" for t in delta.token_ids)
            text.append(piece)
            reason = delta.finish_reason
            if not args.json:
                print(piece, end="", flush=True)
    done = time.perf_counter()
    if timeline is not None:
        paths = timeline.save(args.trace, f"{args.model}, plan {args.plan}")
        busy = ", ".join(f"{g} {f:.0%}" for g, f in timeline.busy_fraction().items())
        print(f"[timeline: {', '.join(map(str, paths.values()))}; busy: {busy}]", file=sys.stderr)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "token_ids": token_ids,
                          "text": "".join(text) if engine.tokenizer else None, "finish_reason": reason,
                          "load_s": round(loaded - started, 3), "generate_s": round(done - loaded, 3)}))
    else:
        print()
        print(f"[{len(token_ids)} tokens in {done - loaded:.2f} s ({reason}), model loaded in "
              f"{loaded - started:.2f} s]", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from serving.config import ServeConfig
    from serving.server import serve

    overrides = {"model": args.model, "plan": args.plan, "host": args.host, "grpc_port": args.grpc_port,
                 "http_port": args.http_port, "api_token": args.api_token, "tls_cert": args.tls_cert,
                 "tls_key": args.tls_key, "warmup": args.warmup,
                 "compile_cache": None if args.compile_cache == "none" else args.compile_cache}
    config = ServeConfig.load(args.config, **overrides) if args.config else \
        ServeConfig(**{k: v for k, v in overrides.items() if v is not None})
    if config.compile_cache is None and args.compile_cache != "none":
        import dataclasses

        from msjax.runtime.compile_cache import DEFAULT_DIR
        config = dataclasses.replace(config, compile_cache=DEFAULT_DIR)  # the command line caches unless told not to
    print(f"loading {config.model} (plan: {config.plan})", file=sys.stderr)

    def planned(choice):
        print(f"plan: {choice.describe()} -- {choice.reason}", file=sys.stderr, flush=True)

    def listening(server):
        if config.warmup:
            print(f"listening on {server.grpc_address} (gRPC) and {server.http_address} (HTTP); compiling the "
                  "step shapes first (/health answers 503 \"loading\" until then)", file=sys.stderr, flush=True)

    server = serve(config, progress=ProgressBar("loading weights"), on_listening=listening, on_plan=planned,
                   warmup_progress=ProgressBar("compiling step shapes", unit="steps"))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    host = server.grpc_address.rpartition(":")[0]
    grpc_port = server.grpc_address.rpartition(":")[2]
    print(f"msjax serving {config.name}\n"
          f"  gRPC  {server.grpc_address}  (msjax.v1.Decode, health, reflection)\n"
          f"  HTTP  {server.http_address}  (OpenAI-compatible /v1/completions, /v1/chat/completions, /metrics)\n"
          f"try:\n"
          f"  curl -s {server.http_address}/v1/completions -H 'Content-Type: application/json' "
          f"""-d '{{"model": "{config.name}", "prompt": "Beautiful is better than", "max_tokens": 16, "temperature": 0}}'\n"""
          f"  {sys.executable} -m serving.client --address {host}:{grpc_port} \"Beautiful is better than\"\n"
          f"  grpcurl -plaintext -d '{{\"prompt\": \"Beautiful is better than\", \"max_tokens\": 16, \"temperature\": 0}}' "
          f"{server.grpc_address} msjax.v1.Decode/Generate   (if you have grpcurl)\n"
          f"Ctrl-C stops (in-flight requests finish first).", flush=True)
    stop.wait()
    print("draining and stopping...", file=sys.stderr, flush=True)
    server.stop()
    return 0


def _drain(engine):
    """Step until every request finished, yielding deltas as they come (so text streams)."""
    while engine.has_unfinished():
        yield from engine.step()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msjax", description="MegaScale-Infer-style MoE serving on JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="continue a prompt (streams the text as it is generated)")
    gen.add_argument("--model", default="tiny-moe", help="HF checkpoint directory or preset name")
    gen.add_argument("--prompt", required=True, help="text (or token ids when the model has no tokenizer)")
    gen.add_argument("--max-tokens", type=int, default=48)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.add_argument("--plan", help="a DeploymentPlan TOML file (default: one device, one program)")
    gen.add_argument("--trace", metavar="DIR", help="write the device timeline (JSON for Perfetto, PNG) to DIR")
    gen.set_defaults(run=_generate)
    srv = sub.add_parser("serve", help="serve a model over gRPC and OpenAI-compatible HTTP")
    srv.add_argument("--config", metavar="FILE.toml", help="a ServeConfig TOML file (flags override it)")
    srv.add_argument("--model", help="HF checkpoint directory or preset name (default tiny-moe)")
    srv.add_argument("--plan", help="a DeploymentPlan TOML file, 'auto' (default: the planner's choice for the "
                     "devices found; colocated on a CPU machine), 'disaggregated' (the demo over 8 host devices) "
                     "or 'colocated' (one device)")
    srv.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    srv.add_argument("--grpc-port", type=int, help="gRPC port (default 50051; 0: any free port)")
    srv.add_argument("--http-port", type=int, help="HTTP port (default 8000; 0: any free port; -1: off)")
    srv.add_argument("--api-token", help="require 'Authorization: Bearer TOKEN' (default: off)")
    srv.add_argument("--tls-cert", help="PEM certificate: TLS for gRPC and HTTP (with --tls-key)")
    srv.add_argument("--tls-key", help="PEM private key")
    srv.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                     help="compile every step shape before reporting ready (default; --no-warmup starts at once "
                     "and compiles each shape when a request first needs it)")
    srv.add_argument("--compile-cache", metavar="DIR", help="JAX's persistent compilation cache: a restart loads "
                     "compiled programs from DIR instead of compiling them (default ~/.cache/msjax/xla; 'none': off)")
    srv.set_defaults(run=_serve)
    # parsed by msjax.launch itself (main() hands it the rest of the command line)
    sub.add_parser("launch", add_help=False, help="generate over a multi-process deployment (plan transport shm, "
                   "tcp or rdma): nodes as processes, packets through the native M2N library")
    from msjax.planner.cli import add_parser as add_plan_parser
    from msjax.planner.profile_cli import add_parser as add_profile_parser
    add_plan_parser(sub)
    add_profile_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Eight XLA host devices only where a plan needs several (launch; generate with a plan; serve decides from
    # its plan): on a CPU machine a one-device program runs slower when eight host devices exist (tiny-moe
    # served colocated at 16 clients, 2026-12-07: 2,130 tok/s with eight host devices, 2,540 with one)
    from msjax.runtime.host_devices import ensure_host_devices
    if argv[:1] == ["launch"]:
        ensure_host_devices()
        from msjax import launch
        return launch.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, MemoryError) as err:  # msjax's input errors name the field or tensor at fault
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
