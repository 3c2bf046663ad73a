"""Helpers of the serving tests: small HTTP calls, a gRPC client without generated stubs, polling, counting
compiles."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def http(method: str, url: str, body=None, headers=None, timeout: float = 60, context=None):
    """(status, parsed JSON or text) of one request; error statuses are returned, not raised."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            status, raw, kind = r.status, r.read().decode(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        status, raw, kind = err.code, err.read().decode(), err.headers.get("Content-Type", "")
    return status, (json.loads(raw) if "json" in kind else raw)


BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax.monitoring: one per XLA compile


CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"  # a program loaded from the persistent cache instead


@contextlib.contextmanager
def count_compiles():
    """The programs this process builds while the block runs (a list that fills): each XLA compilation's
    duration, and 0.0 for each program loaded from a persistent compilation cache (no compile event then, but
    not warmed up either)."""
    import jax
    compiles = []

    def on_duration(event, duration, **_):
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(duration)

    def on_event(event, **_):
        if event == CACHE_HIT_EVENT:
            compiles.append(0.0)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
        jax.monitoring.unregister_event_listener(on_event)


def poll(condition, timeout: float = 30.0, interval: float = 0.01, what: str = "condition"):
    """Wait until condition() is truthy (and return it); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class ReflectionClient:
    """Calls msjax.v1.Decode knowing only the server's address: the schema comes from server reflection."""

    def __init__(self, channel: grpc.Channel, service: str = "msjax.v1.Decode"):
        self.channel = channel
        self.pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        self.service = self.pool.FindServiceByName(service)

    def method(self, name: str):
        method = self.service.FindMethodByName(name)
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        path = f"/{self.service.full_name}/{name}"
        if method.server_streaming:
            call = self.channel.unary_stream(path, request_serializer=request_cls.SerializeToString,
                                             response_deserializer=response_cls.FromString)
        else:
            call = self.channel.unary_unary(path, request_serializer=request_cls.SerializeToString,
                                            response_deserializer=response_cls.FromString)
        return request_cls, call
