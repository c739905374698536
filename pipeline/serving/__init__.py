"""Serving: many models from the model store with hot swap, LRU within a byte budget and dynamic
batching (:mod:`pipeline.serving.registry`), spoken over HTTP by :mod:`pipeline.serving.app`.

The core modules, one concern each: ``registry`` (which versions serve, swaps, budget/LRU,
requests), ``loader`` (one version into the server: tier or storage, verified, golden-checked,
compiled), ``batching`` (per-version dynamic batcher), ``metrics`` (Prometheus), ``watcher``
(the periodic alias poller). Importing this package does not import the HTTP stack.

This package never imports dagster.
"""

from pipeline.serving.metrics import ServingMetrics
from pipeline.serving.registry import (
    InvalidInput,
    ModelNotFound,
    ModelRegistry,
    ServeConfig,
    ServingError,
    Unavailable,
)

__all__ = ["InvalidInput", "ModelNotFound", "ModelRegistry", "ServeConfig", "ServingError", "ServingMetrics",
           "Unavailable"]
