"""Grad-CAM overlays, by hand (the `grad-cam` package needs torchvision, absent here).

For each tile, the gradient of the image's predicted class score with respect to the last
convolutional feature map (captured with a forward hook) weights that map's channels; the
positive part, upsampled, is where the network looked. Tiles are stitched back onto the
micrograph (averaged where they overlap) and drawn over it with a colour map.

This module needs only the network and its device; which class to explain and which tiles come
from the classifier (`Classifier.explain`). Gradients run in float32, without autocast: the maps
are small and a half-precision backward pass would only add noise to them.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from semwatch.model.backbone import TileNet

GRADCAM_BATCH = 8


def tile_cams(net: TileNet, device: torch.device, tiles: np.ndarray, target: int) -> np.ndarray:
    """(N, h, w) Grad-CAM maps in [0, inf) for class `target`, one per tile."""
    captured: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        captured.append(output)

    # The hook sits on the head convolution's batch norm; the activation after it is applied
    # in forward, so the map we weight is the pre-activation one (standard for ReLU6 nets).
    handle = net.backbone.net._bn1.register_forward_hook(keep)
    maps: list[np.ndarray] = []
    try:
        for s in range(0, len(tiles), GRADCAM_BATCH):
            captured.clear()
            x = torch.from_numpy(np.ascontiguousarray(tiles[s : s + GRADCAM_BATCH])).to(device)
            with torch.enable_grad():
                logits, _, _ = net(x)
                net.zero_grad(set_to_none=True)
                logits[:, target].sum().backward()
            fmap = captured[-1]
            grads = fmap.grad
            if grads is None:  # pragma: no cover - the hook always retains the gradient
                raise RuntimeError("no gradient reached the feature map")
            weights = grads.mean(dim=(2, 3), keepdim=True)
            cam = torch.relu((weights * fmap).sum(dim=1)).detach().float().cpu().numpy()
            maps.append(cam)
    finally:
        handle.remove()
        net.zero_grad(set_to_none=True)
    return np.concatenate(maps) if maps else np.zeros((0, 1, 1), np.float32)


def overlay(
    pixels: np.ndarray,
    cams: np.ndarray,
    positions: list[tuple[int, int]],
    resampled_shape: tuple[int, int],
    tile_px: int,
) -> np.ndarray:
    """(H, W, 3) uint8 RGB: grey `pixels` with the tiles' maps stitched and drawn over them.

    `positions` are the tiles' corners in the image resampled to the network's scale
    (`resampled_shape`), where each tile is `tile_px` wide; no tiles, the plain image."""
    grey = np.clip(pixels, 0.0, 1.0)
    base = cv2.cvtColor((grey * 255).astype(np.uint8), cv2.COLOR_GRAY2RGB)
    if len(cams) == 0:
        return base
    rh, rw = resampled_shape
    heat = np.zeros((rh, rw), np.float32)
    weight = np.zeros((rh, rw), np.float32)
    for (y, x), cam in zip(positions, cams, strict=True):
        heat[y : y + tile_px, x : x + tile_px] += cv2.resize(
            cam, (tile_px, tile_px), interpolation=cv2.INTER_LINEAR
        )
        weight[y : y + tile_px, x : x + tile_px] += 1.0
    heat = np.divide(heat, weight, out=np.zeros_like(heat), where=weight > 0)
    heat = np.asarray(
        cv2.resize(heat, (grey.shape[1], grey.shape[0]), interpolation=cv2.INTER_LINEAR), np.float32
    )
    peak = float(heat.max())
    if peak > 0:
        heat /= peak
    colour = cv2.cvtColor(
        cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB
    )
    covered = cv2.resize(weight, (grey.shape[1], grey.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    alpha = np.where(covered, 0.45, 0.0)[..., None]
    return (base * (1 - alpha) + colour * alpha).astype(np.uint8)
