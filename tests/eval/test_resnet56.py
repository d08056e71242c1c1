"""The CIFAR ResNet-56 feature network: architecture, loading, accuracy on the shared test set."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tcaq_kernels.eval.resnet56 import MEAN, STD, BasicBlock, CifarResNet, load_resnet56, preprocess


def test_accuracy_on_jpeg_test_set(reference):
    """83.2 % is the published figure for these JPEGs; a wrong layout lands far from it."""
    acc = float((reference.logits.argmax(1) == reference.labels).mean())
    assert len(reference.labels) == 10000
    assert 0.825 <= acc <= 0.84, f"ResNet-56 accuracy {acc:.4f} outside [0.825, 0.84]"
    assert reference.features.shape == (10000, 64) and np.isfinite(reference.features).all()
    # Pooled after a ReLU: features are non-negative, and not collapsed.
    assert reference.features.min() >= 0 and reference.features.std(axis=0).min() > 0


def test_option_a_shortcut_subsamples_and_zero_pads():
    block = BasicBlock(16, 32, stride=2)
    x = torch.randn(3, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (3, 32, 4, 4)
    assert torch.equal(s[:, 8:24], x[:, :, ::2, ::2])
    assert not s[:, :8].any() and not s[:, 24:].any()
    assert torch.equal(BasicBlock(16, 16).shortcut(x), x)


def test_features_match_logits_through_linear(resnet56_path):
    model = load_resnet56(resnet56_path)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        feats, logits = model.features_and_logits(x)
        assert feats.shape == (5, 64) and logits.shape == (5, 10)
        torch.testing.assert_close(model.linear(feats), logits)
        torch.testing.assert_close(model(x), logits)
    assert not model.training


def test_preprocess_normalises_per_channel():
    img = np.random.randint(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    x = preprocess(img)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    for c in range(3):
        expect = (img[..., c].astype(np.float32) / 255 - MEAN[c]) / STD[c]
        np.testing.assert_allclose(x[:, c].numpy(), expect, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(img.astype(np.float32))


def test_load_rejects_wrong_layout_naming_the_file(tmp_path, resnet56_path):
    ckpt = torch.load(resnet56_path, map_location="cpu", weights_only=True)
    del ckpt["state_dict"]["module.layer3.8.conv2.weight"]
    bad = tmp_path / "bad.th"
    torch.save(ckpt, bad)
    with pytest.raises(ValueError, match="bad.th"):
        load_resnet56(bad)
    with pytest.raises(FileNotFoundError, match="nope.th"):
        load_resnet56(tmp_path / "nope.th")


def test_depth_is_56():
    convs = [m for m in CifarResNet().modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) + 1 == 56  # 55 conv layers + the final linear
