"""Fine-tuning the whole backbone end to end (`[train] backbone`; on CUDA by default), torch only:
it needs gradients."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from semwatch.config import Settings
from semwatch.model.artifact import Json
from semwatch.model.backbone import TileNet
from semwatch.model.runtime import autocast_for
from semwatch.model.train.data import LabelledImage, Recipe, training_tiles
from semwatch.model.train.features import Progress, stream_tiles
from semwatch.output import Output
from semwatch.values import Micrograph

# Linear warm-up over this share of the fine-tuning steps, then a cosine decay to zero: the head,
# trained on frozen features, must not be torn up by the first large steps of a pretrained backbone.
WARMUP_SHARE = 0.1
# Tiles of several images are shuffled together in a buffer of this many batches (the images come
# class by class; a batch of one class would swing the BatchNorm-free updates from class to class).
SHUFFLE_BATCHES = 4


def backbone_mode(settings: Settings, device: torch.device) -> str:
    """`[train] backbone` resolved: "finetune" or "frozen" ("auto": fine-tune on CUDA only)."""
    mode = settings.train.backbone
    if mode == "auto":
        return "finetune" if device.type == "cuda" else "frozen"
    return mode


def finetune(
    net: TileNet,
    items: list[LabelledImage],
    recipe: Recipe,
    n_classes: int,
    settings: Settings,
    device: torch.device,
    out: Output | None,
) -> dict[str, Json]:
    """Train the whole backbone and the head end to end on freshly augmented training tiles.

    Starts from the head fitted on frozen features. AdamW (the head at 10x the backbone's rate),
    linear warm-up then cosine decay, float16 autocast with gradient scaling on CUDA (bfloat16 on a
    CPU that does it natively). BatchNorm statistics stay those of the pretrained network (batches
    of one or two images' tiles would make poor statistics); drop-connect is on."""
    t = settings.train
    net.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    net.train()
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    tiles_per_epoch = len(items) * t.tiles_per_image * (1 + t.augment_copies)
    total = max(1, t.finetune_epochs * math.ceil(tiles_per_epoch / t.batch_size))
    warmup = max(1, int(total * WARMUP_SHARE))
    opt = torch.optim.AdamW(
        [
            {"params": net.backbone.parameters(), "lr": t.finetune_learning_rate},
            {"params": net.head.mlp.parameters(), "lr": t.finetune_learning_rate * 10},
        ],
        weight_decay=t.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: (step + 1) / warmup if step < warmup
        else 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    )
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and settings.model.mixed_precision)
    counts = torch.zeros(n_classes).index_add_(0, torch.tensor([im.label for im in items]),
                                               torch.ones(len(items))).clamp_min(1.0)
    loss_fn = nn.CrossEntropyLoss(weight=(counts.sum() / (n_classes * counts)).clamp(max=20.0).to(device),
                                  label_smoothing=0.05)
    rng = np.random.default_rng([t.seed, 7])
    steps, losses = 0, []

    def step(x: np.ndarray, y: np.ndarray) -> None:
        nonlocal steps
        xb = torch.from_numpy(x).to(device).contiguous(memory_format=torch.channels_last)
        yb = torch.from_numpy(y).to(device)
        opt.zero_grad(set_to_none=True)
        with autocast_for(device, settings):
            feats, _ = net.backbone(xb)
            loss = loss_fn(net.head(feats.float()), yb)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if steps < total:
            sched.step()
        steps += 1
        losses.append(float(loss.detach()))

    skipped: list[str] = []
    with Progress(out, len(items) * t.finetune_epochs, "fine-tuning") as bar:
        for epoch in range(t.finetune_epochs):
            order = [items[i] for i in rng.permutation(len(items))]

            def tiles(i: int, m: Micrograph, epoch: int = epoch) -> np.ndarray:
                r = np.random.default_rng([t.seed, i, epoch, 11])
                return training_tiles(m, recipe, t.tiles_per_image, t.augment_copies, r)

            xs: list[np.ndarray] = []
            ys: list[np.ndarray] = []
            for i, batch in stream_tiles(order, tiles, settings, skipped):
                if len(batch):
                    xs.append(batch)
                    ys.append(np.full(len(batch), order[i].label, np.int64))
                bar.tick(1)
                last = i == len(order) - 1
                if sum(len(x) for x in xs) >= SHUFFLE_BATCHES * t.batch_size or (last and xs):
                    x, y = np.concatenate(xs), np.concatenate(ys)
                    perm = rng.permutation(len(x))
                    x, y = x[perm], y[perm]
                    for s in range(0, len(x), t.batch_size):
                        step(x[s : s + t.batch_size], y[s : s + t.batch_size])
                    xs, ys = [], []
    net.eval()
    return {"steps": steps, "epochs": t.finetune_epochs, "warmup_steps": warmup,
            "first_loss": round(losses[0], 4) if losses else None,
            "last_loss": round(float(np.mean(losses[-10:])), 4) if losses else None}
