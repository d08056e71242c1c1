"""benchmarks/kernels.py's pure parts: which columns a run times, and the embedded model's shape lists."""
import collections

import pytest
import torch


@pytest.fixture(scope="module")
def kb(load_benchmark):
    return load_benchmark("kernels")


def test_impls_filter_keeps_the_baseline(kb):
    impls = {"cublas-bf16": 1, "triton-w8a8": 2, "gluon-w8a8": 3, "gluon-w4a8": 4}
    assert kb.selected(impls, "cublas-bf16", set()) == impls
    assert list(kb.selected(impls, "cublas-bf16", {"gluon-w4a8"})) == ["cublas-bf16", "gluon-w4a8"]
    assert list(kb.selected(impls, "cublas-bf16", {"triton-w8a8", "cudnn-bf16"})) == ["cublas-bf16", "triton-w8a8"]


def test_unknown_impls_are_named_after_the_run(kb, monkeypatch):
    monkeypatch.setattr(kb, "ONLY_IMPLS", {"gluon-w8a8", "gluon-w9a8"})
    monkeypatch.setattr(kb, "SEEN_IMPLS", {"cublas-bf16", "gluon-w8a8"})
    with pytest.raises(SystemExit, match="gluon-w9a8"):
        kb._check_impls()
    monkeypatch.setattr(kb, "ONLY_IMPLS", {"gluon-w8a8"})
    assert kb._check_impls() is None


def test_embedded_shapes_match_the_model(kb):
    """The embedded model's shape lists are what its layers see: one CPU forward with hooks on every Conv2d,
    Linear and (feature-map) GroupNorm, counted per UNet call, against the batch-256 lists."""
    from tcaq_kernels.eval.loading import load_fp_unet

    convs, gemms, norms = collections.Counter(), collections.Counter(), collections.Counter()

    def record(module, inputs, output):
        x = inputs[0]
        if isinstance(module, torch.nn.Conv2d):
            pad = module.padding[0]
            convs[(256, x.shape[1], x.shape[2], x.shape[3], module.out_channels, module.kernel_size[0],
                   module.stride[0], (pad,) * 4)] += 1
        elif isinstance(module, torch.nn.Linear):
            gemms[(256 * (x.numel() // x.shape[-1]), module.out_features, module.in_features)] += 1
        elif x.dim() == 4:  # GroupNorm of a feature map (the attention blocks' norms see [B, C, S])
            norms[(256, x.shape[1], x.shape[2], module.num_groups)] += 1

    unet = load_fp_unet()
    for module in unet.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm)):
            module.register_forward_hook(record)
    with torch.no_grad():
        unet(torch.randn(1, 3, 32, 32), 10)
    assert sorted((*k, n) for k, n in convs.items()) == sorted(kb.CONV["embedded-b256"])
    assert sorted((*k, n) for k, n in gemms.items()) == sorted(kb.GEMM["embedded-b256"])
    assert {g for *_, g in norms} == {kb.NORM_GROUPS}
    assert sorted((b, c, s, n) for (b, c, s, _), n in norms.items()) == sorted(kb.NORM["embedded-b256"])
    assert kb.BATCH["embedded-b64"] == 64 and kb.GEMM["embedded-b64"][0] == (64, 64, 256, 5)
