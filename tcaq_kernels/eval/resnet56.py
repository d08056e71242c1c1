"""CIFAR ResNet-56, the feature network of FID-ResNet56 and of the IS-like score.

Inception-v3 weights cannot be had on the project's machines, so image quality is measured in the
feature space of a classifier trained on CIFAR-10 itself: He et al. (2016)'s 3-stage CIFAR ResNet
(16/32/64 channels, 9 BasicBlocks a stage, "option A" shortcuts: stride-2 subsampling and zero-padded
channels, so the shortcut has no parameters). The 64-d globally pooled activation before the final
linear layer is the feature; the softmax of the logits feeds the IS-like score.

The architecture must match the checkpoint exactly — a wrong one would still load if shapes agreed
and would silently give meaningless features — which is why a test checks its test-set accuracy.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import resnet56_weights_path

#: Input normalisation the checkpoint was trained with (RGB in [0, 1]).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
FEATURE_DIM = 64


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity (or option-A) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes  # extra channels the shortcut fills with zeros

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            # Option A: zero channels split evenly before and after the existing ones.
            half = self.pad // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.pad - half))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3-stage CIFAR ResNet; depth = 6·blocks_per_stage + 2 (ResNet-56: 9 blocks a stage)."""

    def __init__(self, blocks_per_stage: int = 9, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised input [N, 3, 32, 32] → (pooled features [N, 64], logits [N, classes])."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        feats = out.mean(dim=(2, 3))
        return feats, self.linear(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]


def load_resnet56(path: str | os.PathLike | None = None, device=None) -> CifarResNet:
    """ResNet-56 in eval mode with the checkpoint's weights (the `module.` prefix stripped).

    Loading is strict: a missing or unexpected key means the architecture is wrong.
    """
    path = resnet56_weights_path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict with a 'state_dict', got {type(ckpt).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = CifarResNet(blocks_per_stage=9)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: does not fit the CIFAR ResNet-56 layout: {e}") from e
    return model.eval().to(device)


def preprocess(images: torch.Tensor | np.ndarray, device=None) -> torch.Tensor:
    """uint8 NHWC RGB images → normalised float32 NCHW, as the checkpoint expects."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {tuple(x.shape)} {x.dtype}")
    x = x.to(device=device).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def extract(
    model: CifarResNet,
    images: torch.Tensor | np.ndarray,
    batch_size: int = 500,
    device=None,
    progress: bool = True,
    desc: str = "ResNet-56",
) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, 64] and logits [N, 10] (float64 numpy) of uint8 NHWC images, in batches.

    Images stay on the host and travel one batch at a time, so 10k+ images never sit on the GPU.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n = len(images)
    feats = np.empty((n, FEATURE_DIM), dtype=np.float64)
    logits: Optional[np.ndarray] = None
    for lo in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        x = preprocess(images[lo : lo + batch_size], device)
        f, lg = model.features_and_logits(x)
        if logits is None:
            logits = np.empty((n, lg.shape[1]), dtype=np.float64)
        feats[lo : lo + len(x)] = f.double().cpu().numpy()
        logits[lo : lo + len(x)] = lg.double().cpu().numpy()
    if logits is None:
        raise ValueError("no images to extract features from")
    return feats, logits
