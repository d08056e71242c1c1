"""benchmarks/daq_output_error.py measures what its table says: a uniform grid that rounds a map's small
entries away loses row mass (and output), log2 keeps it, and the summary counts the picks it reports."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("daq_output_error")


def _maps(seed: int, rows: int = 24, keys: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax rows over 256 keys without a dominant one: most weights near 1/256, as the UNet's maps."""
    gen = torch.Generator().manual_seed(seed)
    return (1.5 * torch.randn(2, rows, keys, generator=gen)).softmax(-1), torch.randn(2, keys, 8, generator=gen)


def test_a_coarse_uniform_grid_loses_row_mass_and_log2_does_not(bench):
    calls = [(s, *_maps(s)) for s in range(6)]  # six steps of one layer: three thirds of two
    rows = bench.measure({"layer": calls}, steps=6, values=4000, seed=0)
    assert [(r["steps"], r["bits"]) for r in rows] == [(t, b) for t in ("0-2", "2-4", "4-6") for b in (8, 6, 4)]
    by_bits = {b: [r for r in rows if r["bits"] == b] for b in (8, 6, 4)}
    # 4-bit uniform steps (~max/15) exceed most entries: the tail rounds to 0 and the rows lose mass
    assert all(r["uniform"]["row_mass_error"] > 2 * r["log2"]["row_mass_error"] for r in by_bits[4])
    assert all(r["lower_pv_error"] == "log2" for r in by_bits[4])
    # the tail rounds down to 0 on the uniform grid (mass lost); log2's √2-midpoint rounding inflates each
    # value by 2^-u on average over u ∈ [-½, ½] (≈ +2 % for values spread evenly in log2)
    assert all(r["uniform"]["row_mass_bias"] < -0.1 for r in by_bits[4])
    assert all(0.0 < r["log2"]["row_mass_bias"] < 0.05 for r in rows)
    assert all(r["lower_pv_error"] == "uniform" for r in by_bits[8])  # log2's 2^k rounding costs more there
    for r in rows:
        assert r["daq_pick"] in ("uniform", "log2")
        assert all(r[k]["entry_mse"] > 0 and r[k]["pv_rel_error"] > 0 for k in ("uniform", "log2"))
    cells = bench.summary_lines(rows)[4].split("|")  # the 4-bit line: maps, DAQ's log2 picks, lower-error log2
    assert int(cells[2]) == 3 and int(cells[3]) == sum(r["daq_pick"] == "log2" for r in by_bits[4]) and int(cells[4]) == 3
