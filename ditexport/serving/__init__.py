"""Serving many requests: the step-level batching engine, the Ray Serve service and its client."""
