"""What a training run takes and how it fails: :class:`TrainConfig` (travels in the job file to every
rank and node) and the errors the launcher, the checkpoints and the node entrypoint raise."""

from __future__ import annotations

from dataclasses import dataclass, field


class TrainingFailed(RuntimeError):
    """A rank failed (exception, OOM, killed) or a collective timed out; message has the cause."""


class TrainingTimeout(TrainingFailed):
    """The whole run exceeded its wall-clock budget and was stopped."""


@dataclass
class TrainConfig:
    """Hyperparameters and run controls (JSON-serializable: it travels in the job file)."""

    epochs: int = 15
    lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int = 64  # per rank, per micro-batch
    accumulation: int = 1  # micro-batches per optimizer step
    amp: str = "auto"  # auto | bf16 | fp16 | fp32
    seed: int = 0
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9)
    model: str = "digits_cnn"
    model_kwargs: dict = field(default_factory=dict)
    num_threads: int = 0  # DALI + intra-op threads per rank; 0 = cores / ranks
    keep_checkpoints: int = 2
    collective_timeout_s: float = 120.0  # a dead peer fails the step after this long, not never
    rdzv_join_timeout_s: int = 600  # multi-node: a node that never joins fails the others after this long
    save_rank_weights: bool = False  # tests: each rank dumps its final parameters

    def check_before_launch(self, train_samples: int | None, world_size: int, device_type: str) -> None:
        """:class:`TrainingFailed` before any rank starts for what every rank would fail at: fp16
        autocast on CPU, or an optimizer step that needs more samples than a rank gets (each rank
        drops its last, incomplete batch: every epoch would take no step, and the run end with its
        initial weights and a NaN loss; not checked when ``train_samples`` is unknown)."""
        if self.amp == "fp16" and device_type != "cuda":
            raise TrainingFailed(f"amp fp16 needs a CUDA device (this run's ranks are on {device_type}): "
                                 "use bf16, fp32 or auto")
        if train_samples is None:
            return
        per_rank, step = train_samples // max(1, world_size), self.batch_size * self.accumulation
        if step > per_rank:
            raise TrainingFailed(
                f"batch_size {self.batch_size} x accumulation {self.accumulation} = {step} samples per optimizer "
                f"step, but each of the {world_size} ranks gets {per_rank} training samples ({train_samples} in "
                f"all): no step would be taken; lower batch_size or accumulation")
