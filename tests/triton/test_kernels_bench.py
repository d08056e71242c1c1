"""benchmarks/kernels.py's pure parts: which columns a run times."""
import pytest


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
