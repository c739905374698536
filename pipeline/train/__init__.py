"""Mixed-precision DDP training under torchrun: ``launcher`` (the caller's process supervises
torchrun), ``worker`` (one rank: build, epochs, evaluation, result), ``checkpoints`` (atomic,
resumable, in the storage) and ``nodes`` (multi-node job spec and per-node entrypoint). See
docs/training.md."""

from pipeline.train.config import TrainConfig, TrainingFailed, TrainingTimeout
from pipeline.train.launcher import TrainResult, launch
from pipeline.train.nodes import prepare_node_job, read_node_result

__all__ = ["TrainConfig", "TrainResult", "TrainingFailed", "TrainingTimeout", "launch", "prepare_node_job",
           "read_node_result"]
