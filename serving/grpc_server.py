"""The gRPC front end (grpc.aio): `msjax.v1.Decode` plus the standard health and reflection services."""

from __future__ import annotations

import asyncio
import hmac
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from msjax.engine.sampling_params import InvalidRequestError
from serving.engine_loop import EngineFailure, Overloaded, Unavailable
from serving.frontend import Frontend
from serving.proto.msjax.v1 import decode_pb2, decode_pb2_grpc

log = logging.getLogger("msjax.serving")

SERVICE_NAME = decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name  # "msjax.v1.Decode"


def _optional(request, name):
    return getattr(request, name) if request.HasField(name) else None


def _delta_to_proto(delta, request_id: str, prompt_tokens: int, total_output: int) -> decode_pb2.GenerateResponse:
    out = decode_pb2.GenerateResponse(request_id=request_id, text=delta.text or "", token_ids=delta.token_ids)
    if delta.logprobs is not None:
        for token, lp in zip(delta.token_ids, delta.logprobs):
            out.logprobs.append(decode_pb2.TokenLogprobs(
                token_id=token, logprob=lp[token],
                top=[decode_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.items() if t != token]))
    if delta.finished:
        out.finish_reason = delta.finish_reason or ""
        out.usage.CopyFrom(decode_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=total_output,
                                            total_tokens=prompt_tokens + total_output))
    return out


def _plan_toml(plan) -> str:
    """ModelInfo.plan: the deployment plan as TOML, "" for the one-device colocated default (decode.proto)."""
    return "" if plan.is_colocated and plan.num_devices == 1 else plan.to_toml()


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, frontend: Frontend):
        self.fe = frontend
        self.token = frontend.config.api_token

    async def _check_auth(self, context) -> None:
        if self.token is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        sent = metadata.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {self.token}".encode()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong 'authorization: Bearer' token")

    async def Generate(self, request, context):
        await self._check_auth(context)
        try:
            if request.prompt and request.prompt_token_ids:
                raise InvalidRequestError("prompt", "set either prompt or prompt_token_ids, not both")
            if request.prompt_token_ids:
                ids = self.fe.encode(list(request.prompt_token_ids), "prompt_token_ids")
            else:
                ids = self.fe.encode(request.prompt, "prompt")
            params = {name: _optional(request, name) for name in
                      ("max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs")}
            params["stop"] = list(request.stop) or None
            params["stop_token_ids"] = list(request.stop_token_ids) or None
            params["ignore_eos"] = request.ignore_eos
            sampling = self.fe.sampling(params)
            request_id = request.request_id or self.fe.new_id("grpc")
            stream = self.fe.open(request_id, ids, sampling)
        except InvalidRequestError as err:
            self.fe.metrics.record_rejected("invalid")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Overloaded as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except Unavailable as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        total = 0
        try:
            remaining = context.time_remaining()
            async with asyncio.timeout(remaining if remaining is not None else None):
                async for delta in stream:
                    total += len(delta.token_ids)
                    yield _delta_to_proto(delta, request_id, len(ids), total)
        except TimeoutError:
            stream.close()
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed; the request was aborted")
        except EngineFailure as err:
            await context.abort(grpc.StatusCode.INTERNAL, str(err))
        except InvalidRequestError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        finally:
            stream.close()  # cancelled by the client or the deadline: abort in the engine, free the KV pages

    async def Tokenize(self, request, context):
        await self._check_auth(context)
        if self.fe.engine.tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this model has no tokenizer")
        try:
            ids = self.fe.encode(request.text, "text")
        except InvalidRequestError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        tokens = [self.fe.engine.tokenizer.id_to_token(i) or "" for i in ids]
        return decode_pb2.TokenizeResponse(token_ids=ids, tokens=tokens)

    async def ModelInfo(self, request, context):
        await self._check_auth(context)
        engine, cfg = self.fe.engine, self.fe.engine.model_config
        return decode_pb2.ModelInfoResponse(
            model=self.fe.config.name, architecture=cfg.architecture, vocab_size=cfg.vocab_size,
            max_model_len=engine.max_model_len, num_layers=cfg.num_layers, num_experts=cfg.num_experts,
            experts_per_token=cfg.top_k, has_tokenizer=engine.tokenizer is not None,
            eos_token_ids=list(engine.eos_token_ids), max_prompt_tokens=self.fe.max_prompt_tokens,
            max_tokens_cap=self.fe.max_tokens_cap, plan=_plan_toml(engine.plan),
            num_kv_pages=engine.num_total_pages(), page_size=engine.config.page_size)


class GrpcServer:
    """Built and started on the server's asyncio loop."""

    def __init__(self, frontend: Frontend):
        self.fe = frontend
        self.server = None
        self.health = None
        self.port = None
        self._watch = None  # the task following the runner's health while serving

    async def start(self, host: str, port: int) -> int:
        config = self.fe.config
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        decode_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(self.fe), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if config.tls_cert:
            with open(config.tls_key, "rb") as k, open(config.tls_cert, "rb") as c:
                credentials = grpc.ssl_server_credentials([(k.read(), c.read())])
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot bind gRPC to {address}")
        await self.set_not_serving()  # until the server has warmed up (set_serving)
        await self.server.start()
        return self.port

    async def set_serving(self) -> None:
        """SERVING from now on, while the deployment can step: a watcher follows the runner's health (NOT_SERVING
        once it cannot, e.g. every expert node lost) until `set_not_serving`."""
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._follow_health())

    async def _follow_health(self, every_s: float = 0.5) -> None:
        serving = True
        while True:
            await asyncio.sleep(every_s)
            ready = self.fe.health()[0] != "not ready"
            if ready != serving:
                serving = ready
                status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
                for service in ("", SERVICE_NAME):
                    await self.health.set(service, status)

    async def set_not_serving(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self.health is not None:
            for service in ("", SERVICE_NAME):
                await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float) -> None:
        if self.server is not None:
            await self.server.stop(grace)
