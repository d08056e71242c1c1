"""benchmarks/daq_fade.py's --reconstruction-only / --row-max merge: new rows replace the old ones of the same
setting and keep every other row in order."""
from __future__ import annotations


def row(rule, reconstruct, psnr, scope="all", scale="searched"):
    return {"bits": "W4A4", "scope": scope, "daq_rule": rule, "reconstruct": reconstruct, "log2_scale": scale,
            "psnr_db": psnr}


def test_merge_replaces_same_setting_only(load_benchmark):
    bench = load_benchmark("daq_fade")
    old = [row("uniform", False, 14.4), row("log2", False, 14.0), row("log2", False, 14.0, scale="1"),
           row("uniform", True, 1.0), row("uniform", False, 26.4, scope="attention")]
    new = [row("uniform", True, 20.0), row("log2", True, 19.0)]
    out = bench.merged(old, new)
    assert [r["psnr_db"] for r in out] == [14.4, 14.0, 14.0, 26.4, 20.0, 19.0]
    assert bench.merged(old, []) == old


def test_row_max_rows_sit_beside_the_softmax_ones(load_benchmark):
    """A `--row-max` row (p_map "row-max") replaces only its own setting; rows written before the column
    existed count as softmax maps."""
    bench = load_benchmark("daq_fade")
    old = [row("uniform", False, 26.4, scope="attention"), {**row("uniform", False, 30.0, scope="attention"),
                                                            "p_map": "row-max"}]
    new = [{**row("uniform", False, 40.0, scope="attention"), "p_map": "row-max"}]
    assert [r["psnr_db"] for r in bench.merged(old, new)] == [26.4, 40.0]
    measured = {"log2_share": 0.0, "log2_scale_median": None, "fine_energy_ratio": 1.0, "calib_seconds": 50}
    assert "| attention | row-max | uniform | no |" in bench.markdown([{**new[0], **measured}], "c")


def test_notes_follow_the_table(load_benchmark):
    """Readings kept in the json's "notes" come after the table on every rewrite."""
    bench = load_benchmark("daq_fade")
    r = {**row("uniform", False, 14.4), "log2_share": 0.0, "log2_scale_median": None, "fine_energy_ratio": 0.9,
         "calib_seconds": 60}
    md = bench.markdown([r], "c", ["First reading.", "Second reading."])
    table_row = md.index("| W4A4 | all | softmax | uniform | no |")
    assert table_row < md.index("First reading.") < md.index("Second reading.")
