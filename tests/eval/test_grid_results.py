"""Sample grids and the shared quality.json row writer."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from PIL import Image

from tcaq_kernels.eval.grid import make_grid, save_comparison_grid
from tcaq_kernels.eval.results import merge_rows, read_rows, upsert_rows


def test_make_grid_places_images():
    imgs = np.random.randint(0, 256, (10, 4, 5, 3), dtype=np.uint8)
    g = make_grid(imgs, nrow=4, padding=1, pad_value=7)
    assert g.shape == (3 * 5 + 1, 4 * 6 + 1, 3)
    for i, img in enumerate(imgs):
        r, c = divmod(i, 4)
        np.testing.assert_array_equal(g[1 + r * 5 : 1 + r * 5 + 4, 1 + c * 6 : 1 + c * 6 + 5], img)
    assert (g[0] == 7).all() and (g[11:, 13:] == 7).all()  # padding and the two empty cells


def test_comparison_grid_png(tmp_path):
    fp = np.random.randint(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    q = np.random.randint(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    one = Image.open(save_comparison_grid(tmp_path / "fp.png", fp))
    two = Image.open(save_comparison_grid(tmp_path / "both.png", fp, q, test_label="W8A8"))
    side = 8 * 34 + 2
    assert one.size == (2 * side, 2 * side + 16)
    assert two.size == (2 * (2 * side) + 12, 2 * side + 16)
    # Top-left image of the left panel, upscaled ×2, sits below the label strip after the padding.
    px = np.asarray(two)[16 + 4 : 16 + 4 + 64 : 2, 4 : 4 + 64 : 2]
    np.testing.assert_array_equal(px, fp[0])
    with pytest.raises(ValueError, match="differ"):
        save_comparison_grid(tmp_path / "x.png", fp, q[:8])


def test_merge_rows_replaces_by_key_in_place():
    old = [{"preset": "fp", "bits": "fp", "n_samples": 10, "v": 1},
           {"preset": "tcaq", "bits": "W8A8", "n_samples": 10, "v": 2}]
    new = [{"preset": "fp", "bits": "fp", "n_samples": 10, "v": 3},
           {"preset": "fp", "bits": "fp", "n_samples": 20, "v": 4}]
    assert [r["v"] for r in merge_rows(old, new)] == [3, 2, 4]


def test_upsert_keeps_file_valid_and_refuses_bad_input(tmp_path):
    path = tmp_path / "results" / "quality.json"
    upsert_rows(path, [{"preset": "fp", "bits": "fp", "n_samples": 10, "fid": 1.0}])
    upsert_rows(path, [{"preset": "q", "bits": "W4A8", "n_samples": 10, "fid": 2.0}])
    upsert_rows(path, [{"preset": "fp", "bits": "fp", "n_samples": 10, "fid": 1.5}])
    assert read_rows(path) == json.loads(path.read_text()) == [
        {"preset": "fp", "bits": "fp", "n_samples": 10, "fid": 1.5},
        {"preset": "q", "bits": "W4A8", "n_samples": 10, "fid": 2.0}]
    before = path.read_text()
    with pytest.raises(KeyError, match="bits"):
        upsert_rows(path, [{"preset": "x", "n_samples": 1}])
    with pytest.raises(ValueError):  # NaN is not JSON
        upsert_rows(path, [{"preset": "x", "bits": "fp", "n_samples": 1, "fid": float("nan")}])
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["quality.json"]
    path.write_text("{not json")
    with pytest.raises(ValueError, match="quality.json"):
        upsert_rows(path, [{"preset": "fp", "bits": "fp", "n_samples": 10}])


def test_concurrent_writers_lose_no_rows(tmp_path):
    path = tmp_path / "quality.json"
    rows = [{"preset": f"p{i}", "bits": "W8A8", "n_samples": 64, "i": i} for i in range(16)]
    threads = [threading.Thread(target=upsert_rows, args=(path, [r])) for r in rows]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["i"] for r in read_rows(path)) == list(range(16))
