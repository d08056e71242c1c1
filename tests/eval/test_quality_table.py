"""benchmarks/quality.py: job parsing, the portable commands and the markdown table (no calibration run)."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def quality(load_benchmark):
    return load_benchmark("quality")


def test_jobs_parse_and_bad_ones_are_refused(quality):
    assert quality.parse_job("qdiffusion+tcr:W4A8:2000") == ("qdiffusion+tcr", "W4A8", 2000)
    with pytest.raises(Exception, match="PRESET:BITS:N_SAMPLES"):
        quality.parse_job("tcaq:W4A8")
    with pytest.raises(Exception, match="unknown preset 'nosuch'"):
        quality.parse_job("nosuch:W4A8:16")
    assert quality.parse_job("fp-tf32:fp:2000") == ("fp-tf32", "fp", 2000)


def test_commands_are_portable_and_float_jobs_skip_calibration(quality, tmp_path):
    a = quality.parse_args(["--allow-tf32", "--ref-npz", "/x/cifar.npz", "--option", "iters=10"])
    calib, ev = quality.job_commands("tcaq", "W6A6", 10000, a, tmp_path / "s.tcaq", tmp_path / "d")
    text = f"{quality.portable(calib)} && {quality.portable(ev)}"
    assert text == ("python -m tcaq_kernels calibrate --method tcaq --bits W6A6 --seed 1000000 --out STATE --option "
                    "iters=10 && python -m tcaq_kernels evaluate --state STATE --backend simulate --n-samples 10000 "
                    "--steps 100 --batch-size 2000 --out DIR --allow-tf32")
    calib, ev = quality.job_commands("fp-tf32", "fp", 2000, a, tmp_path / "s.tcaq", tmp_path / "d")
    assert calib == [] and "--state" not in ev


def test_markdown_compares_only_at_equal_sample_count(quality):
    fp = {"preset": "fp", "bits": "fp", "n_samples": 10000, "fid_resnet56": 3.0, "card": "H100"}
    rows = [
        fp,
        {"preset": "tcaq", "bits": "W4A8", "n_samples": 10000, "fid_resnet56": 3.3, "psnr_vs_fp": 27.0,
         "calib_seconds": 227.0, "card": "H200", "state_sha256": "ab" * 32, "command": "c1", "allow_tf32": False,
         "fine_energy_ratio": 1.1, "eps_rel_error": 0.0191, "eps_error_shared": 0.3, "eps_rms_own_last": 1.46},
        {"preset": "qdiffusion+tcr", "bits": "W4A8", "n_samples": 2000, "fid_resnet56": 4.0, "psnr_vs_fp": None,
         "calib_seconds": None, "card": "H200", "state_sha256": None, "command": "c2"},
    ]
    md = quality.render_markdown(rows)
    assert "| W4A8 | tcaq | 10000 | 3.300 | +10.0 % | 27.00 | 0.0191 | 0.30 | 1.46 | 1.100 | 227 | H200 | — | `abababababab` |" in md
    assert "| W4A8 | qdiffusion+tcr | 2000 | 4.000 | — | — | — | — | — | — | — | H200 | — | `—` |" in md
    assert md.index("| W4A8 | tcaq | 10000") < md.index("| W4A8 | qdiffusion+tcr | 2000")
    assert "`c1`" in md and "`c2`" in md


def test_variant_jobs_pass_their_options_and_keep_their_name(quality, tmp_path):
    assert quality.parse_job("tcaq@shortcut-a8:W4A4:10000") == ("tcaq@shortcut-a8", "W4A4", 10000)
    with pytest.raises(Exception, match="unknown variant"):
        quality.parse_job("tcaq@nope:W4A4:10000")
    a = quality.parse_args([])
    calib, _ = quality.job_commands("tcaq@shortcut-a8", "W4A4", 10000, a, tmp_path / "s.tcaq", tmp_path / "d")
    assert calib[calib.index("--method") + 1] == "tcaq"
    assert 'act_bits={"*.conv_shortcut":8}' in calib
    # variants combine left to right: an ablation calibrated on the second trajectories
    assert quality.variant_options("tcaq@no-par,seed-b") == {"par_rounds": 0, "seed": 2_000_000}
    with pytest.raises(Exception, match="unknown variant 'nope'"):
        quality.parse_job("tcaq@no-par,nope:W4A8:10000")


def test_markdown_delta_uses_the_float_row_of_the_same_count_and_arithmetic(quality):
    rows = [
        {"preset": "fp", "bits": "fp", "n_samples": 10000, "fid_resnet56": 3.0, "card": "H100"},
        {"preset": "fp-tf32", "bits": "fp", "n_samples": 2000, "fid_resnet56": 5.0, "card": "H200", "allow_tf32": True,
         "command": "f"},
        {"preset": "qdiffusion+par", "bits": "W4A8", "n_samples": 2000, "fid_resnet56": 5.5, "card": "H200",
         "allow_tf32": True, "command": "c", "calib_seconds": 90.0, "code_commit": "abc1234", "note": "shared GPU"},
    ]
    md = quality.render_markdown(rows)
    assert "| W4A8 | qdiffusion+par | 2000 | 5.500 | +10.0 % | — | — | — | — | — | 90* | H200 (TF32) | abc1234 |" in md
    assert "W4A8 qdiffusion+par (n=2000): shared GPU" in md


def test_a_replaced_calibration_is_kept_and_the_spread_is_tabled(quality):
    row = lambda preset, fid, sha, commit: {"preset": preset, "bits": "W4A8", "n_samples": 10000, "fid_resnet56": fid,
                                            "psnr_vs_fp": 25.0, "card": "H200", "state_sha256": sha,
                                            "code_commit": commit, "command": "c"}
    first = row("qdiffusion", 3.4, "a" * 64, "c1")
    second = quality.with_earlier(row("qdiffusion", 5.8, "b" * 64, "c2"), [first])
    assert [e["fid_resnet56"] for e in second["earlier"]] == [3.4] and second["earlier"][0]["code_commit"] == "c1"
    third = quality.with_earlier(row("qdiffusion", 4.0, "c" * 64, "c3"), [second])
    assert [e["fid_resnet56"] for e in third["earlier"]] == [3.4, 5.8]
    # the same state evaluated again is not a second calibration
    again = quality.with_earlier(row("qdiffusion", 4.1, "c" * 64, "c3"), [third])
    assert [e["fid_resnet56"] for e in again["earlier"]] == [3.4, 5.8]
    assert "earlier" not in quality.with_earlier(row("tcaq", 3.7, "d" * 64, "c2"), [first])

    rows = [third, row("qdiffusion@seed-b", 4.3, "e" * 64, "c3"), row("qdiffusion@no-par", 9.0, "f" * 64, "c3"),
            row("tcaq", 3.7, "d" * 64, "c3")]
    md = quality.render_markdown(rows)
    line = next(x for x in md.splitlines() if x.startswith("| W4A8 | qdiffusion | 10000 | 3.400"))
    assert line == "| W4A8 | qdiffusion | 10000 | 3.400 (c1), 5.800 (c2), 4.000 (c3), 4.300 (c3 seed-b) | 4.375 | 3.400–5.800 |"
    assert "9.000 (" not in md and "| W4A8 | tcaq | 10000 | 3.700 (" not in md  # other variants, single runs: no line
    md = quality.render_markdown(rows + [row("qdiffusion@no-par,seed-b", 8.0, "g" * 64, "c3")])
    assert "| W4A8 | qdiffusion@no-par | 10000 | 9.000 (c3), 8.000 (c3 seed-b) | 8.500 | 8.000–9.000 |" in md


def test_two_jobs_of_one_state_calibrate_it_once(quality, tmp_path, monkeypatch):
    """The 10,000- and 2,000-sample rows of one (preset, bits), running at once: one calibration, both rows."""
    import json
    import threading
    import time

    calls, threads, lock = [], set(), threading.Lock()

    def fake_run(cmd, **kwargs):
        out = Path(cmd[cmd.index("--out") + 1])
        with lock:
            calls.append(cmd[3])
            threads.add(kwargs["env"]["OMP_NUM_THREADS"])
        if cmd[3] == "calibrate":
            time.sleep(0.3)  # long enough for the other job to arrive while this one calibrates
            out.write_bytes(b"state")
        else:
            out.mkdir(parents=True, exist_ok=True)
            n = int(cmd[cmd.index("--n-samples") + 1])
            (out / "report.json").write_text(json.dumps({
                "n_samples": n, "steps": 100, "fid_resnet56": 4.0, "is_resnet56": 6.0, "psnr_vs_fp": 25.0,
                "device": "test", "versions": {"torch": "t", "triton": "t"}}))

    a = quality.parse_args(["--reuse-states", "--out", str(tmp_path), "--results", str(tmp_path / "q.json"),
                            "--gpus", "0", "1", "--jobs", "qdiffusion:W4A8:10000", "qdiffusion:W4A8:2000"])
    monkeypatch.setattr(quality.subprocess, "run", fake_run)
    monkeypatch.setattr(quality, "summarize_state", lambda path: {"state_sha256": "x"})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    rows = quality.run_all(a)
    assert calls.count("calibrate") == 1 and calls.count("evaluate") == 2
    assert threads == {str(quality.job_threads(2))}  # the two workers share the host's cores
    assert sorted(r["n_samples"] for r in rows) == [2000, 10000]


def test_jobs_share_the_host_cores(quality):
    assert quality.job_threads(4, cores=64) == 16 and quality.job_threads(3, cores=64) == 21
    assert quality.job_threads(8, cores=2) == 1 and quality.job_threads(1, cores=16) == 16


def test_detach_copies_the_code_seeds_the_results_and_pins_the_paths(quality, tmp_path, monkeypatch):
    import json

    out, results = tmp_path / "q", tmp_path / "old.json"
    results.write_text('[{"preset": "fp", "bits": "fp", "n_samples": 10000, "fid_resnet56": 3.0}]')
    argv = ["--detach", "--out", str(out), "--results", str(results), "--gpus", "0", "--jobs", "tcaq:W4A8:10000"]
    a = quality.parse_args(argv)
    started = {}

    class FakeRunner:  # stands in for the detached process: records its command, sets the marker
        def __init__(self, cmd, cwd, **kwargs):
            started.update(cmd=cmd, cwd=Path(cwd), new_session=kwargs.get("start_new_session"))
            (out / "RUNNING").write_text("1\n")
            self.pid = 1

        def poll(self):
            return None

    with monkeypatch.context() as m:
        m.setattr(quality.subprocess, "Popen", FakeRunner)
        assert quality.detach(argv, a) == 0
    cmd = started["cmd"]
    assert started["new_session"] and (started["cwd"] / "benchmarks" / "quality.py").exists()
    assert not (started["cwd"] / ".git").exists() and Path(cmd[1]).is_relative_to(started["cwd"])
    assert "--detach" not in cmd and cmd[cmd.index("--jobs") + 1] == "tcaq:W4A8:10000"
    assert quality.parse_args(cmd[2:]).results == str(out.resolve() / "quality.json")
    assert json.loads((out / "quality.json").read_text())[0]["fid_resnet56"] == 3.0  # earlier rows kept
    with pytest.raises(SystemExit, match="already"):  # one runner per --out
        quality.detach(argv, a)


def test_wait_follows_the_log_until_the_marker_goes(quality, tmp_path, capsys):
    import threading

    (tmp_path / "RUNNING").write_text("1\n")
    (tmp_path / "runner.log").write_text("[gpu 0] job 1 done\n")
    assert quality.wait_for_runner(tmp_path, 0.2, poll=0.05) == 3  # still running at the deadline
    threading.Timer(0.2, (tmp_path / "RUNNING").unlink).start()
    assert quality.wait_for_runner(tmp_path, 10, poll=0.05) == 0
    assert capsys.readouterr().out.count("job 1 done") == 2  # each call echoes the log from its start


def test_a_float_row_summarises_without_psnr_or_calibration(quality):
    # the fp-tf32 job of 27 Nov finished, but its log line raised on the missing PSNR and counted it failed
    assert quality.row_summary({"fid_resnet56": 3.0021, "psnr_vs_fp": None}) == "FID-ResNet56 3.002, PSNR — dB, calib — s"
    assert quality.row_summary({"fid_resnet56": 4.7352, "psnr_vs_fp": 20.537, "calib_seconds": 248.82}) == \
        "FID-ResNet56 4.735, PSNR 20.54 dB, calib 248.8 s"


def test_a_row_carries_the_par_guard_verdicts(quality, ref_state_w8a8, tmp_path):
    """The states stay on the GPU machine, so the row keeps what the guard saw in each round."""
    import copy

    state = copy.deepcopy(ref_state_w8a8)
    verdict = {"before": {"psnr_db": 16.4, "fine_ratio": 0.39, "fade": 0.94},
               "after": {"psnr_db": 15.0, "fine_ratio": 0.04, "fade": 3.2}, "kept": False}
    state.settings = {**state.settings, "par": [{"round": 1, "iters": 500, "guard": verdict}], "par_rounds_kept": 0}
    summary = quality.summarize_state(state.save(tmp_path / "s.tcaq"))
    assert summary["par_rounds_kept"] == 0 and summary["par_guard"] == [{"round": 1, **verdict}]
    unguarded = copy.deepcopy(ref_state_w8a8)
    unguarded.settings = {**unguarded.settings, "par": [{"round": 1, "iters": 500}]}
    assert quality.summarize_state(unguarded.save(tmp_path / "u.tcaq"))["par_guard"] is None


def test_two_runs_of_one_decision_share_the_tensor_digest_not_the_file_hash(quality, ref_state_w8a8, tmp_path):
    """Two full `@deterministic` W4A4 calibrations of 27 Nov (ninth session) gave one FID to 16 digits but two
    file hashes: the manifest records each run's calibration time."""
    import copy

    later = copy.deepcopy(ref_state_w8a8)
    later.settings = {**later.settings, "calib_seconds": 304.0}
    a = quality.summarize_state(ref_state_w8a8.save(tmp_path / "a.tcaq"))
    b = quality.summarize_state(later.save(tmp_path / "b.tcaq"))
    assert a["state_sha256"] != b["state_sha256"] and a["state_tensors_sha256"] == b["state_tensors_sha256"]
    moved = copy.deepcopy(ref_state_w8a8)
    name, layer = next((n, l) for n, l in moved.layers.items() if l.kind != "attention")
    layer.weight_scale = layer.weight_scale * 1.5  # one decision changed: the digest follows
    assert quality.summarize_state(moved.save(tmp_path / "c.tcaq"))["state_tensors_sha256"] != a["state_tensors_sha256"], name
