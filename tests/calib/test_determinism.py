"""`deterministic=True`: torch's deterministic kernels for the whole calibration, settings restored after."""
from __future__ import annotations

import copy

import pytest
import torch

from tcaq_kernels.calib import preset_config
from tcaq_kernels.calib.determinism import deterministic_algorithms
from tcaq_kernels.calib.pipeline import calibrate_with_config


def _flags() -> tuple:
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)


def test_switch_sets_and_restores_the_process_settings():
    before = _flags()
    with deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
    assert _flags() == before
    with pytest.raises(ValueError, match="boom"), deterministic_algorithms(True):
        raise ValueError("boom")
    assert _flags() == before  # also after a failure
    with deterministic_algorithms(False):
        assert _flags() == before  # off: nothing touched


def test_missing_deterministic_kernel_names_the_option():
    with pytest.raises(RuntimeError, match="deterministic=True") as err, deterministic_algorithms(True):
        raise RuntimeError("index_fake_cuda does not have a deterministic implementation")
    assert "index_fake_cuda" in str(err.value) and isinstance(err.value.__cause__, RuntimeError)


def _content(state) -> tuple[dict, dict]:
    """The state's tensors and manifest without what differs between two runs of one calibration (times,
    and the switch itself)."""
    tensors, manifest = state._flatten()
    settings = {k: v for k, v in manifest["settings"].items() if k not in ("calib_seconds", "phase_seconds", "deterministic")}
    return tensors, {**manifest, "settings": settings}


def _same(a, b) -> bool:
    (ta, ma), (tb, mb) = _content(a), _content(b)
    return ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _tcaq(tiny_budget: dict, **options):
    return preset_config("tcaq", **{**tiny_budget, "timestep_groups": 2, "par_rounds": 1, **options})


def test_cpu_calibration_is_the_same_with_the_switch(tiny_unet, tiny_scheduler, tiny_budget):
    """On the CPU the calibration is reproducible already: the switch must not change a bit of it."""
    before = _flags()
    plain = calibrate_with_config(tiny_unet, tiny_scheduler, "W4A4", _tcaq(tiny_budget), "tcaq")
    strict = calibrate_with_config(tiny_unet, tiny_scheduler, "W4A4", _tcaq(tiny_budget, deterministic=True), "tcaq")
    assert strict.settings["deterministic"] is True and plain.settings["deterministic"] is False
    assert _same(plain, strict)
    assert _flags() == before


@pytest.mark.cuda
def test_gpu_calibrations_of_one_seed_are_identical(tiny_unet, tiny_scheduler, tiny_budget):
    """The point of the switch: two GPU runs of one configuration give one state (without it, the backward
    passes' reduction order makes them drift; calib/determinism.py)."""
    unet = copy.deepcopy(tiny_unet).cuda()
    cfg = _tcaq(tiny_budget, deterministic=True, iters=20)
    first = calibrate_with_config(unet, tiny_scheduler, "W4A4", cfg, "tcaq")
    second = calibrate_with_config(unet, tiny_scheduler, "W4A4", cfg, "tcaq")
    assert first.settings["par"] and first.settings["round0_blocks"]
    assert _same(first, second)
