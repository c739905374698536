"""Held-out evaluation of a model on published shards, in-process (no torchrun): what the packaging
gates use to compare an exported or quantized model against the trained one."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.preprocess import PreprocessSpec, WebDatasetLoader


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    loss: float
    samples: int


def eval_loader(shards: list[str], spec: dict, batch_size: int, device: str) -> WebDatasetLoader:
    """Every sample of ``shards`` in stored order, preprocessed as in evaluation (center crop, no
    shuffling), on ``device`` (a torch device string: ``cpu``, ``cuda:1``)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    return WebDatasetLoader(shards, batch_size=batch_size, spec=PreprocessSpec(**spec), training=False,
                            device="gpu" if cuda else "cpu", device_id=(dev.index or 0) if cuda else None)


@torch.no_grad()
def evaluate(model: torch.nn.Module, shards: list[str], spec: dict, *, batch_size: int = 256, device: str = "cpu") -> EvalResult:
    """Accuracy and mean cross-entropy of ``model`` over every sample of ``shards`` (eval mode)."""
    model = model.to(device).eval()
    correct, loss_sum, n = 0, 0.0, 0
    with eval_loader(shards, spec, batch_size, device) as loader:
        for x, y in loader.epoch(0):
            out = model(x).float()
            loss_sum += float(torch.nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            n += len(y)
    if n == 0:
        raise ValueError(f"no samples in {shards}")
    return EvalResult(correct / n, loss_sum / n, n)


def fixed_batch(shards: list[str], spec: dict, *, size: int = 64) -> torch.Tensor:
    """The first ``size`` preprocessed images of ``shards`` in stored order: a deterministic input
    for checking that two copies of a model compute the same outputs."""
    with eval_loader(shards, spec, size, "cpu") as loader:
        for x, _ in loader.epoch(0):
            return x.clone()  # the loader reuses its buffers
    raise ValueError(f"no samples in {shards}")
