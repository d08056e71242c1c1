"""benchmarks/ab_env.py's pure parts: the --variant syntax and the comparison table."""
import argparse
import json

import pytest


@pytest.fixture(scope="module")
def ab(load_benchmark):
    return load_benchmark("ab_env")


def test_variant_syntax(ab):
    assert ab.parse_variant("tldot:TCAQ_WGMMA=0") == ("tldot", {"TCAQ_WGMMA": "0"})
    assert ab.parse_variant("old:PYTHONPATH=/a/b:/c") == ("old", {"PYTHONPATH": "/a/b:/c"})
    assert ab.parse_variant("both:A=1,B=64") == ("both", {"A": "1", "B": "64"})
    for bad in ("TCAQ_WGMMA=1", "x:", "x:A", "default:A=1", ":A=1", "x:=1"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME:ENV=VALUE"):
            ab.parse_variant(bad)


def test_compare_rows_and_medians(ab):
    row = lambda shape, impl, ms: {"op": "conv", "model": "m", "shape": shape, "impl": impl, "ms": ms}
    default = [row("s1", "triton", 2e-3), row("s2", "triton", 4e-3), row("s1", "cudnn", 1e-3)]
    hoist = [row("s1", "triton", 1e-3), row("s2", "triton", 5e-3), row("s1", "cudnn", 1e-3)]
    md = ab.compare(default, {"hoist": hoist, "none": [row("s1", "cudnn", 2e-3)]})  # rows in ms, table in µs
    assert "| conv | m | s1 | triton | 2.0 | 1.0 (2.00) | — |" in md
    assert "| conv | m | s2 | triton | 4.0 | 5.0 (0.80) | — |" in md
    assert "| conv | m | s1 | cudnn | 1.0 | 1.0 (1.00) | 2.0 (0.50) |" in md
    assert "| conv | m | triton | hoist | 1.400 | 0.80 | 2.00 | 2 |" in md  # median of 2.0 and 0.8
    assert "| conv | m | cudnn | none | 0.500 | 0.50 | 0.50 | 1 |" in md


def test_each_variant_runs_in_its_own_process_with_its_env(ab, tmp_path, monkeypatch):
    """main() on a stand-in kernels.py whose time depends on an environment switch."""
    fake = tmp_path / "kernels.py"
    fake.write_text("import json, os, sys, pathlib\n"
                    "out = pathlib.Path(sys.argv[sys.argv.index('--out') + 1]); out.mkdir(parents=True)\n"
                    "ms = 1e-3 if os.environ.get('FAST') == '1' else 2e-3\n"
                    "row = {'op': 'conv', 'model': 'm', 'shape': sys.argv[-1], 'impl': 'triton', 'ms': ms}\n"
                    "(out / 'kernels.json').write_text(json.dumps([row]))\n")
    monkeypatch.setattr(ab, "KERNELS", fake)
    assert ab.main(["--out", str(tmp_path / "ab"), "--variant", "fast:FAST=1", "--", "--shapes", "s1"]) == 0
    md = (tmp_path / "ab" / "ab.md").read_text()
    assert "| conv | m | s1 | triton | 2.0 | 1.0 (2.00) |" in md and "fast: FAST=1" in md
    rows = json.loads((tmp_path / "ab" / "ab.json").read_text())
    assert [(r["variant"], r["env"]) for r in rows] == [("default", {}), ("fast", {"FAST": "1"})]
    with pytest.raises(SystemExit):
        ab.main(["--out", str(tmp_path / "x"), "--variant", "fast:FAST=1", "--", "--out", "y"])
