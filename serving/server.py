"""`msjax.serve(config)`: one engine behind a gRPC and an OpenAI-compatible HTTP front end.

    with msjax.serve(msjax.ServeConfig(grpc_port=0, http_port=0)) as server:
        print(server.grpc_address, server.http_address)

Start-up: load the model, open both front ends while still "loading" (HTTP `/health` answers 503
{"status": "loading"}, gRPC health NOT_SERVING), compile every step shape the server will meet (`warmup`, on by
default: the first request is then as fast as the tenth), then report ready (`/health` 200, SERVING). Requests
that arrive while it loads are accepted and wait for the engine loop, which starts when the warm-up is done.

Threads: the caller's (load, warm up, then `stop`), the engine loop (owns the Engine), and one asyncio loop that
runs both front ends. `stop()` is graceful: health turns NOT_SERVING and new requests are refused, in-flight requests finish
(up to `drain_timeout_s`, then they are aborted), the servers close and the threads are joined.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading

from serving.config import ServeConfig

log = logging.getLogger("msjax.serving")


class Server:
    """A running server: `grpc_address` ("host:port"), `http_address` ("http://host:port", None when off),
    `engine`, `metrics`; `stop()`, `wait()`; a context manager that stops on exit."""

    def __init__(self, config: ServeConfig, engine=None, progress=None, warmup_progress=None, on_listening=None,
                 on_plan=None):
        """`progress(done, total)`: weight loading in bytes; `warmup_progress(done, total)`: the warm-up's step
        shapes; `on_listening(server)`: called once both front ends listen, before the warm-up (the addresses
        are known, `/health` still answers "loading"); `on_plan(choice)`: the plan chosen and why
        (msjax.planner.local.PlanChoice), before the weights load."""
        from msjax.loading import resolve_model_path
        from serving.engine_loop import EngineLoop
        from serving.frontend import Frontend
        from serving.metrics import Metrics

        self.config = config
        self._owns_engine = engine is None  # stop() then releases what it holds (node processes of the plan)
        if config.compile_cache is not None:  # before anything compiles, and before node processes start
            from msjax.runtime import compile_cache
            compile_cache.enable(config.compile_cache)
        self.plan_choice = None  # the plan and why; None when an engine was given
        if engine is None:
            engine, self.plan_choice = load_engine(config, progress=progress, on_plan=on_plan)
            model_path = resolve_model_path(config.model)
        else:
            model_path = None
            try:
                model_path = resolve_model_path(config.model)
            except Exception:  # noqa: BLE001 - an injected engine need not come from a path
                pass
        self.engine = engine
        self.metrics = Metrics(config.name, engine.model_config.num_experts, engine.num_total_pages())
        if getattr(engine.runner, "faults", None) is not None:  # a runner over expert nodes counts their losses
            self.metrics.fault_stats = lambda: engine.runner.faults
        self.loop = EngineLoop(engine, self.metrics, max_concurrent=config.max_concurrent_requests,
                               max_queue=config.max_queue)
        self.frontend = Frontend(engine, self.loop, config, self.metrics)
        self._model_path = model_path
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._aio = asyncio.new_event_loop()
        self._aio_thread = threading.Thread(target=self._aio.run_forever, name="msjax-serving-io", daemon=True)
        self.grpc = self.http = None
        self.grpc_address = self.http_address = None
        self._aio_thread.start()
        try:
            self._call(self._start_frontends())
            if on_listening is not None:
                on_listening(self)
            if config.warmup:  # before the engine loop starts: the warm-up has the engine to itself
                log.info("compiling the step shapes of %s before serving", config.name)
                self.loop.warmup(progress=warmup_progress)
            self.loop.start()
            self._call(self._report_ready())
        except BaseException:
            self.stop(drain_timeout=0)
            raise
        log.info("serving %s: gRPC on %s, HTTP on %s", config.name, self.grpc_address, self.http_address)

    def _call(self, coro, timeout: float | None = 60):
        return asyncio.run_coroutine_threadsafe(coro, self._aio).result(timeout)

    async def _start_frontends(self) -> None:
        from serving.grpc_server import GrpcServer
        from serving.http_server import HttpApi

        cfg = self.config
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        self.grpc = GrpcServer(self.frontend)
        port = await self.grpc.start(cfg.host, cfg.grpc_port)
        self.grpc_address = f"{host}:{port}"
        if cfg.http_port != -1:
            self.http = HttpApi(self.frontend, self._model_path)
            context = None
            if cfg.tls_cert:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
            port = await self.http.start(cfg.host, cfg.http_port, context)
            self.http_address = f"{'https' if context else 'http'}://{host}:{port}"

    async def _report_ready(self) -> None:
        await self.grpc.set_serving()
        if self.http is not None:
            self.http.state = "ok"

    def stop(self, drain_timeout: float | None = None) -> None:
        """Graceful shutdown: refuse new requests, drain in-flight ones, close the servers, join the threads,
        and close the engine the server built (stopping a multi-process plan's node processes). Safe to call
        twice."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            timeout = self.config.drain_timeout_s if drain_timeout is None else drain_timeout
            self.loop.stop_admitting()
            if self._aio_thread.is_alive():
                if self.http is not None:
                    self.http.state = "draining"
                if self.grpc is not None:
                    self._call(self.grpc.set_not_serving(), 10)
            if self.loop._thread.is_alive():  # (not yet started when the warm-up failed)
                self.loop.shutdown(timeout)  # drains (streams keep flowing on the io loop), then stops the loop
            if self._aio_thread.is_alive():
                try:
                    if self.grpc is not None:
                        self._call(self.grpc.stop(1.0), 30)
                    if self.http is not None:
                        self._call(self.http.stop(), 30)
                finally:
                    self._aio.call_soon_threadsafe(self._aio.stop)
                    self._aio_thread.join(30)
            if not self._aio.is_running():
                self._aio.close()
            if self._owns_engine and not self.loop._thread.is_alive():
                self.engine.close()
            self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stopped (for the CLI); True when it did."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def load_engine(config: ServeConfig, *, progress=None, on_plan=None):
    """The Engine `config` describes, on the plan it resolves to, and that PlanChoice: what the server runs
    (and what bench/serve_load.py compares it with). Forces eight host devices first where the plan may need
    several; `on_plan(choice)` is called before the weights load."""
    from msjax.engine.engine import Engine
    from msjax.runtime.host_devices import ensure_host_devices
    if config.needs_host_devices:
        ensure_host_devices()  # eight host devices, so a plan of up to 8 devices runs on a CPU machine
    choice = config.plan_choice()
    log.info("plan: %s (%s)", choice.describe(), choice.reason)
    if on_plan is not None:
        on_plan(choice)
    return Engine.from_pretrained(config.model, plan=choice.plan, progress=progress, **config.engine), choice


def serve(config: ServeConfig | None = None, *, engine=None, progress=None, warmup_progress=None,
          on_listening=None, on_plan=None) -> Server:
    """Load the model (or use `engine`), start the gRPC and HTTP front ends, warm up (`config.warmup`) and return
    the running, ready `Server`."""
    return Server(config or ServeConfig(), engine=engine, progress=progress, warmup_progress=warmup_progress,
                  on_listening=on_listening, on_plan=on_plan)
