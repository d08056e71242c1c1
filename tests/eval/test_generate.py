"""Evaluation sampling: shard plan, interrupt-and-resume, damaged shards, and torchrun data parallelism."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tcaq_kernels.eval.generate import generate_samples, load_samples, plan_shards, shard_name

REPO = Path(__file__).resolve().parents[2]
N, STEPS, BATCH = 6, 3, 2


def test_plan_shards():
    assert plan_shards(5, 10, 2) == [[10, 11], [12, 13], [14]]
    assert plan_shards(4, 0, 4) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError):
        plan_shards(0, 0, 2)


def _run(unet, sched, out, **kw):
    return generate_samples(unet, sched, out, N, num_steps=STEPS, batch_size=BATCH, progress=False, **kw)


def test_interrupt_and_resume_equals_one_go(ref_unet, ref_scheduler, tmp_path):
    base = int(np.random.default_rng().integers(0, 10_000))
    one = _run(ref_unet, ref_scheduler, tmp_path / "one", seed_base=base)
    assert (one.shards_total, one.shards_done, one.samples_done) == (3, 3, N)

    part = _run(ref_unet, ref_scheduler, tmp_path / "resumed", seed_base=base, max_shards=1)  # "interrupted"
    assert part.shards_done == 1
    with pytest.raises(FileNotFoundError, match="2 of 3 shards"):
        load_samples(tmp_path / "resumed")
    rest = _run(ref_unet, ref_scheduler, tmp_path / "resumed", seed_base=base)
    assert (rest.shards_done, rest.shards_skipped) == (2, 1)

    a, sa = load_samples(tmp_path / "one")
    b, sb = load_samples(tmp_path / "resumed")
    assert a.shape == (N, 32, 32, 3) and a.dtype == np.uint8 and a.std() > 10  # real images, not blanks
    np.testing.assert_array_equal(sa, np.arange(base, base + N))
    np.testing.assert_array_equal(sa, sb)
    np.testing.assert_array_equal(a, b)

    again = _run(ref_unet, ref_scheduler, tmp_path / "one", seed_base=base)  # nothing left to do
    assert (again.shards_done, again.shards_skipped) == (0, 3)


def test_damaged_shard_is_regenerated_and_settings_are_checked(ref_unet, ref_scheduler, tmp_path):
    _run(ref_unet, ref_scheduler, tmp_path)
    good, _ = load_samples(tmp_path)
    shard = tmp_path / shard_name(1)
    shard.write_bytes(shard.read_bytes()[:100])  # a torn write from some other tool
    redo = _run(ref_unet, ref_scheduler, tmp_path)
    assert (redo.shards_done, redo.shards_skipped) == (1, 2)
    np.testing.assert_array_equal(load_samples(tmp_path)[0], good)
    with pytest.raises(ValueError, match="other settings"):
        generate_samples(ref_unet, ref_scheduler, tmp_path, N, num_steps=STEPS + 1, batch_size=BATCH, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _torchrun(nproc: int, out: Path, seed_base: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tcaq_kernels.eval.generate", "--out", str(out), "--n-samples", "8", "--steps", str(STEPS),
           "--batch-size", "2", "--seed-base", str(seed_base), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stats = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"rank"')]
    assert len(stats) == nproc, f"expected one stats line per rank, got stdout:\n{proc.stdout[-4000:]}"
    return stats


def test_two_gloo_ranks_equal_one_process(tmp_path):
    """torchrun with 2 CPU ranks (gloo) writes the same samples as 1 rank, split by shard."""
    base = int(np.random.default_rng().integers(0, 10_000))
    solo = _torchrun(1, tmp_path / "solo", base)
    duo = _torchrun(2, tmp_path / "duo", base)
    assert [s["world_size"] for s in solo] == [1] and sorted(s["rank"] for s in duo) == [0, 1]
    assert all(s["world_size"] == 2 and s["shards_done"] == 2 for s in duo)  # 4 shards: 0,2 and 1,3
    a, sa = load_samples(tmp_path / "solo")
    b, sb = load_samples(tmp_path / "duo")
    np.testing.assert_array_equal(sa, np.arange(base, base + 8))
    np.testing.assert_array_equal(sa, sb)
    np.testing.assert_array_equal(a, b)
