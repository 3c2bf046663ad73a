"""Device-side execution: runs the programs the engine asks for (colocated here; disaggregated groups and the
ping-pong loop arrive with the disaggregation work)."""
