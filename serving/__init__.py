"""The decode service: `serving.server.serve` (re-exported as `msjax.serve`), its gRPC and OpenAI-compatible HTTP
front ends, the engine-loop thread and the metrics. See docs/serving.md."""
