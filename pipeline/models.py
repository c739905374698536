"""Model architectures by name, so a checkpoint's config (``{"name": ..., "kwargs": ...}``) is enough
to rebuild the module anywhere — including on the meta device for streaming export/loading."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Small conv net for 1x28x28 digits: two conv blocks, global pooling, linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(in_channels, width), block(width, 2 * width))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(2 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


REGISTRY: dict[str, type[nn.Module]] = {"digits_cnn": DigitsCNN}


def build_model(name: str, **kwargs) -> nn.Module:
    """Instantiate a registered architecture (use ``with torch.device("meta"):`` for no storage)."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {sorted(REGISTRY)}") from None
    return cls(**kwargs)
