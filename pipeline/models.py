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


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class ResNet50(nn.Module):
    """ResNet-50 (v1.5: stride in the 3x3 conv), for throughput benchmarks against public numbers;
    torchvision has no CPU wheel here, so it is defined in-house."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        ]
        cin = 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(blocks):
                layers.append(_Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * 4
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


REGISTRY: dict[str, type[nn.Module]] = {"digits_cnn": DigitsCNN, "resnet50": ResNet50}


def build_model(name: str, **kwargs) -> nn.Module:
    """Instantiate a registered architecture (use ``with torch.device("meta"):`` for no storage)."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {sorted(REGISTRY)}") from None
    return cls(**kwargs)
