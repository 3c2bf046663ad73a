"""The OpenAI-compatible HTTP front end (aiohttp): /v1/completions, /v1/chat/completions (server-sent events
when `stream` is true), /v1/models, /health and /metrics.

Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}}; `param` names the field at fault.

Chat prompts come from the model's chat template (`serving.chat`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time

from aiohttp import web

from msjax.engine.sampling_params import InvalidRequestError
from serving.chat import ChatTemplate
from serving.engine_loop import EngineFailure, Overloaded, Unavailable
from serving.frontend import Frontend

log = logging.getLogger("msjax.serving")

COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                     "stop_token_ids", "ignore_eos", "logprobs", "stream", "stream_options", "n", "echo", "user",
                     "presence_penalty", "frequency_penalty", "best_of", "logit_bias", "suffix"}
CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
               "stop", "stop_token_ids", "ignore_eos", "logprobs", "top_logprobs", "stream", "stream_options", "n",
               "user", "presence_penalty", "frequency_penalty", "logit_bias", "add_generation_prompt"}


class HttpError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def response(self) -> web.Response:
        return web.json_response({"error": {"message": self.message, "type": self.type, "param": self.param,
                                            "code": self.code}}, status=self.status)


def _is_json(media_type: str) -> bool:
    """application/json, or a structured type built on it (application/merge-patch+json, ...)."""
    kind, _, sub = media_type.lower().partition("/")
    return kind == "application" and (sub == "json" or sub.endswith("+json"))


def _invalid(err: InvalidRequestError) -> HttpError:
    return HttpError(400, str(err), err.field, code="invalid_value")


class HttpApi:
    def __init__(self, frontend: Frontend, model_path=None):
        self.fe = frontend
        self.name = frontend.config.name
        self.created = int(time.time())
        self.chat = ChatTemplate(model_path)
        self.app = web.Application(middlewares=[self._errors])
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_post("/v1/chat/completions", self.chat_completions)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/metrics", self.metrics)
        self.state = "loading"  # "loading" (warming up) -> "ok" -> "draining"; /health is 200 only when "ok"
        self.runner = None

    # --- plumbing ---

    @web.middleware
    async def _errors(self, request, handler):
        token = self.fe.config.api_token
        if token is not None and request.path not in ("/health",):
            sent = request.headers.get("Authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                return HttpError(401, "missing or wrong 'Authorization: Bearer' token", None,
                                 "authentication_error", "invalid_api_key").response()
        try:
            return await handler(request)
        except HttpError as err:
            return err.response()
        except web.HTTPException as err:
            if err.status >= 400:
                return HttpError(err.status, err.reason, None, "invalid_request_error").response()
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as err:  # noqa: BLE001 - one request's failure is not the server's
            log.exception("HTTP request failed")
            return HttpError(500, f"internal error: {err}", None, "server_error").response()

    async def start(self, host: str, port: int, ssl_context=None) -> int:
        self.runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=ssl_context, reuse_port=False)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _body(self, request, known: set[str]) -> dict:
        sent_type = request.headers.get("Content-Type")
        if sent_type is not None and not _is_json(request.content_type):  # no Content-Type at all: JSON assumed
            raise HttpError(415, f"Content-Type {sent_type!r} is not JSON: send the body as 'Content-Type: "
                            "application/json' (curl: -H 'Content-Type: application/json')", None,
                            code="unsupported_media_type")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HttpError(400, "the body is not valid JSON", None) from None
        if not isinstance(body, dict):
            raise HttpError(400, "the body must be a JSON object", None)
        unknown = sorted(set(body) - known)
        if unknown:
            raise HttpError(400, f"{unknown[0]}: unsupported field", unknown[0], code="unsupported_field")
        model = body.get("model")
        if model is not None and model != self.name:
            raise HttpError(404, f"model: {model!r} is not served here; this server serves {self.name!r}",
                            "model", code="model_not_found")
        for name, ok in (("n", lambda v: v == 1), ("best_of", lambda v: v == 1), ("echo", lambda v: v is False),
                         ("presence_penalty", lambda v: v == 0), ("frequency_penalty", lambda v: v == 0),
                         ("logit_bias", lambda v: not v), ("suffix", lambda v: not v)):
            if body.get(name) is not None and not ok(body[name]):
                raise HttpError(400, f"{name}: only the default is supported, got {body[name]!r}", name,
                                code="unsupported_value")
        if not isinstance(body.get("stream", False), bool):
            raise HttpError(400, f"stream: must be a boolean, got {body['stream']!r}", "stream")
        options = body.get("stream_options")
        if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
            raise HttpError(400, f"stream_options: only include_usage is supported, got {options!r}",
                            "stream_options")
        return body

    def _open(self, kind: str, ids: list[int], sampling):
        try:
            return self.fe.open(self.fe.new_id(kind), ids, sampling)
        except Overloaded as err:
            raise HttpError(429, str(err), None, "rate_limit_error", "overloaded") from None
        except Unavailable as err:
            raise HttpError(503, str(err), None, "server_error", "shutting_down") from None
        except InvalidRequestError as err:
            raise _invalid(err) from None

    def _token_text(self, token: int) -> str:
        tok = self.fe.engine.tokenizer
        return tok.decode([token], skip_special_tokens=False) if tok is not None else str(token)

    async def _sse(self, request, chunks) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            async with contextlib.aclosing(chunks):  # a client that went away closes (aborts) the request now
                async for chunk in chunks:
                    await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        except (EngineFailure, InvalidRequestError) as err:  # after the headers went out: an error event
            error = {"message": str(err), "type": "server_error", "param": getattr(err, "field", None), "code": None}
            await response.write(f"data: {json.dumps({'error': error})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _collect(self, stream):
        token_ids, text, logprobs, reason = [], [], [], None
        try:
            async for delta in stream:
                token_ids += delta.token_ids
                text.append(delta.text or "")
                if delta.logprobs is not None:
                    logprobs += list(zip(delta.token_ids, delta.logprobs))
                reason = delta.finish_reason if delta.finished else reason
        except EngineFailure as err:
            raise HttpError(500, str(err), None, "server_error") from None
        finally:
            stream.close()
        return token_ids, "".join(text), logprobs, reason

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def _sampling(self, body: dict, *, max_tokens, logprobs, default_max_tokens):
        params = {k: body.get(k) for k in ("temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                                           "ignore_eos")}
        params["max_tokens"], params["logprobs"] = max_tokens, logprobs
        try:
            return self.fe.sampling(params, default_max_tokens=default_max_tokens)
        except InvalidRequestError as err:
            raise _invalid(err) from None

    # --- /v1/completions ---

    def _completion_logprobs(self, pairs, start: int = 0) -> dict:
        """OpenAI's completion logprobs of (token, {token: logprob}) pairs; `text_offset` gives each token's
        character offset in the completion (as vLLM does: the running length of the tokens' texts, from `start`,
        the length of the tokens streamed in earlier chunks)."""
        tokens = [self._token_text(t) for t, _ in pairs]
        offsets = []
        for text in tokens:
            offsets.append(start)
            start += len(text)
        return {"tokens": tokens, "token_logprobs": [lp[t] for t, lp in pairs],
                "top_logprobs": [{self._token_text(k): v for k, v in lp.items()} for _, lp in pairs],
                "text_offset": offsets}

    async def completions(self, request):
        body = await self._body(request, COMPLETION_FIELDS)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt))):
            raise HttpError(400, "prompt: must be a string or a list of token ids (one prompt per request)",
                            "prompt")
        try:
            ids = self.fe.encode(prompt, "prompt")
        except InvalidRequestError as err:
            raise _invalid(err) from None
        logprobs = body.get("logprobs")
        sampling = self._sampling(body, max_tokens=body.get("max_tokens"), logprobs=logprobs, default_max_tokens=16)
        stream = self._open("cmpl", ids, sampling)
        head = {"id": stream.request_id, "object": "text_completion", "created": int(time.time()),
                "model": self.name}
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            async def chunks():
                total = offset = 0
                try:
                    async for delta in stream:
                        total += len(delta.token_ids)
                        lp = None
                        if delta.logprobs is not None:
                            lp = self._completion_logprobs(list(zip(delta.token_ids, delta.logprobs)), offset)
                            offset += sum(map(len, lp["tokens"]))
                        yield {**head, "choices": [{"index": 0, "text": delta.text or "", "logprobs": lp,
                                                    "finish_reason": delta.finish_reason if delta.finished else None}]}
                    if include_usage:
                        yield {**head, "choices": [], "usage": self._usage(len(ids), total)}
                finally:
                    stream.close()
            return await self._sse(request, chunks())
        token_ids, text, pairs, reason = await self._collect(stream)
        return web.json_response({**head, "choices": [{
            "index": 0, "text": text, "finish_reason": reason,
            "logprobs": self._completion_logprobs(pairs) if logprobs is not None else None}],
            "usage": self._usage(len(ids), len(token_ids))})

    # --- /v1/chat/completions ---

    def _chat_prompt(self, messages, add_generation_prompt: bool) -> str:
        try:
            return self.chat.render(messages, add_generation_prompt)
        except InvalidRequestError as err:
            raise HttpError(400, str(err), err.field) from None

    def _chat_logprobs(self, pairs, top: int) -> dict:
        def entry(token, logprob):
            text = self._token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        return {"content": [{**entry(t, lp[t]), "top_logprobs": [entry(k, v) for k, v in list(lp.items())[:top]]}
                            for t, lp in pairs]}

    async def chat_completions(self, request):
        body = await self._body(request, CHAT_FIELDS)
        if not isinstance(body.get("add_generation_prompt", True), bool):
            raise HttpError(400, "add_generation_prompt: must be a boolean", "add_generation_prompt")
        if self.fe.engine.tokenizer is None:
            raise HttpError(400, "messages: this model has no tokenizer, so it cannot chat; use /v1/completions "
                            "with token ids", "messages")
        text = self._chat_prompt(body.get("messages"), body.get("add_generation_prompt", True))
        try:
            ids = self.fe.encode(text, "messages")
        except InvalidRequestError as err:
            raise _invalid(err) from None
        want_logprobs = body.get("logprobs", False)
        if not isinstance(want_logprobs, bool):
            raise HttpError(400, f"logprobs: must be a boolean, got {want_logprobs!r}", "logprobs")
        top = body.get("top_logprobs")
        if top is not None and (isinstance(top, bool) or not isinstance(top, int)):
            raise HttpError(400, f"top_logprobs: must be an integer, got {type(top).__name__} {top!r}",
                            "top_logprobs")
        if top is not None and not want_logprobs:
            raise HttpError(400, "top_logprobs: needs logprobs=true", "top_logprobs")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        default = min(self.fe.max_tokens_cap, self.fe.max_model_len - len(ids))
        try:
            sampling = self._sampling(body, max_tokens=max_tokens, logprobs=(top or 0) if want_logprobs else None,
                                      default_max_tokens=default)
        except HttpError as err:
            if err.param == "logprobs":
                err.param = "top_logprobs"
                err.message = "top_logprobs" + err.message[len("logprobs"):]
            raise
        stream = self._open("chatcmpl", ids, sampling)
        head = {"id": stream.request_id, "created": int(time.time()), "model": self.name}
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            async def chunks():
                total = 0
                first = True
                try:
                    async for delta in stream:
                        total += len(delta.token_ids)
                        content = {"role": "assistant", "content": delta.text or ""} if first else \
                            {"content": delta.text or ""}
                        first = False
                        lp = None
                        if delta.logprobs is not None:
                            lp = self._chat_logprobs(list(zip(delta.token_ids, delta.logprobs)), top or 0)
                        yield {**head, "object": "chat.completion.chunk", "choices": [{
                            "index": 0, "delta": content, "logprobs": lp,
                            "finish_reason": delta.finish_reason if delta.finished else None}]}
                    if include_usage:
                        yield {**head, "object": "chat.completion.chunk", "choices": [],
                               "usage": self._usage(len(ids), total)}
                finally:
                    stream.close()
            return await self._sse(request, chunks())
        token_ids, text, pairs, reason = await self._collect(stream)
        return web.json_response({**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
            "logprobs": self._chat_logprobs(pairs, top or 0) if want_logprobs else None}],
            "usage": self._usage(len(ids), len(token_ids))})

    # --- the rest ---

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{
            "id": self.name, "object": "model", "created": self.created, "owned_by": "msjax",
            "max_model_len": self.fe.max_model_len}]})

    async def health(self, request):
        """200 {"status": "ok"} or {"status": "degraded", "detail": ...} (serving on fewer expert nodes); 503
        while starting, draining, or when the deployment cannot step ("not ready", with why)."""
        if self.state != "ok":
            return web.json_response({"status": self.state}, status=503)
        status, detail = self.fe.health()
        body = {"status": status, **({"detail": detail} if detail else {})}
        return web.json_response(body, status=503 if status == "not ready" else 200)

    async def metrics(self, request):
        return web.Response(text=self.fe.metrics.render(), content_type="text/plain",
                            headers={"X-Content-Type-Options": "nosniff"})
