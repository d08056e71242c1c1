"""The quality table of issue 3: calibrate each (preset, bits), evaluate it, record one row per job.

Each job runs the two public commands, so every row carries the command that reproduces it:

    python -m tcaq_kernels calibrate --method PRESET --bits BITS --seed 1000000 --out STATE
    python -m tcaq_kernels evaluate --state STATE --backend simulate --n-samples N --steps 100 --out DIR

Calibration trajectories start at seed 1,000,000, so they never share noise with the evaluation seeds
(0 … N−1, the full-precision row's seeds): the same-seed PSNR is measured on held-out seeds.
Jobs are spread over the visible GPUs (one job per GPU at a time, `--gpus 0 1 2 3`); each finished job
is upserted into the results file at once (`tcaq_kernels.eval.results`: rows with the same preset, bits
and n_samples are replaced), so an interrupted run keeps what it finished. `--render` rewrites the
markdown table from the JSON without running anything.

    python benchmarks/quality.py --jobs tcaq:W4A8:10000 qdiffusion:W4A8:10000 --gpus 0 1 --out out/quality

While jobs run, `OUT/RUNNING` exists (it holds the runner's pid). On machines that limit each command's
time and re-send the checkout between commands (the lent GPU machines), start the run with `--detach` —
it copies the code to a temporary folder, starts the runner there in a new session and returns; rows go
to OUT/quality.json (seeded from --results) — and follow it with `--wait SECONDS` in each later command:

    python benchmarks/quality.py --detach --out /tmp/q --gpus 0 1 2 3 --jobs …   # then, call after call:
    python benchmarks/quality.py --wait 560 --out /tmp/q   # exit 0: finished, 3: still running
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import queue
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("tcaq_kernels") is None:  # not installed: use this checkout
    sys.path.insert(0, str(REPO))

from tcaq_kernels.atomic import atomic_write_text  # noqa: E402
from tcaq_kernels.calib import METHODS  # noqa: E402
from tcaq_kernels.eval.fid import sha256_file  # noqa: E402
from tcaq_kernels.eval.results import read_rows, upsert_rows  # noqa: E402

CALIB_SEED = 1_000_000
RESULTS = REPO / "benchmarks" / "results" / "quality.json"
MARKDOWN = REPO / "benchmarks" / "results" / "quality.md"
BITS_ORDER = ("fp", "W8A8", "W6A6", "W4A8", "W4A4")
# Named option sets a job may add to its preset (`tcaq@shortcut-a8:W4A4:10000`); the row's preset keeps the
# name, so a mixed-precision row never passes for the plain bit width.
VARIANTS = {
    # the 13 1×1 shortcut convs read 8-bit activations: where W4A4 loses most (calib/README.md)
    "shortcut-a8": {"act_bits": {"*.conv_shortcut": 8}},
    # tcaq minus one part, to find which one costs FID where tcaq trails qdiffusion (W4A8, 26 Nov)
    "no-tcr": {"tcr": False},
    "no-daq": {"daq": False},
    "no-par": {"par_rounds": 0},
    "one-group": {"timestep_groups": 1},
    "daq-llr": {"daq_rule": "llr"},  # the paper's DAQ test alone (ours adds a lower-MSE condition)
    # DAQ's per-group post-softmax sets with the kind forced: which of the two fades qdiffusion+daq at W4A4
    "daq-uniform": {"daq_rule": "uniform"},
    "daq-log2": {"daq_rule": "log2"},
    # half of each PAR round's points from the full-precision trajectories (PAR fades W4A4; calib README)
    "par-anchor": {"par_float_share": 0.5},
    # PAR without its guard (every round kept): the presets as measured before the guard (27 Nov, fifth session)
    "no-guard": {"par_guard_samples": 0},
    # PAR rounds keep round 0's weight rounding, learn step sizes only (re-learned rounding is most of
    # the W4A4 fade on the CPU middle budget: fine energy 0.84 kept vs 0.15 re-learned; calib README)
    "par-keep-rounding": {"par_learn_rounding": False},
    # the first guard (439da3c): PSNR decisive too, both at tolerance 0 — it undid round 1 at every bit width
    "guard-strict": {"par_guard_fade_tol": 0.0, "par_guard_psnr_tol_db": 0.0},
    # the same method calibrated on other trajectories (seeds from 2,000,000): the spread between two
    # calibrations, which any difference between rows has to exceed before it means anything
    "seed-b": {"seed": 2_000_000},
    # the 13 1×1 shortcut convs kept in float: their inputs carry most of W8A8's error (CPU: 39.5 → 47.0 dB
    # with them float; calib README "Where W8A8 loses")
    "shortcut-float": {"keep_float": ["conv_in", "conv_out", "*.conv_shortcut"]},
    # torch's deterministic kernels (calib/determinism.py): GPU calibrations of one seed otherwise differ
    # (W4A4 FID 12.1 vs 16.5, 27 Nov); with it two runs of a job should give one state_sha256
    "deterministic": {"deterministic": True},
    # DAQ's log2 post-softmax sets learn their scale in reconstruction as the uniform ones do (config.py)
    "log2-learned": {"learn_log2_scale": True},
    # each row of the quantized post-softmax map divided by its own quantized mass (CalibState v3; config.py)
    "rownorm": {"p_row_norm": True},
    # the map quantized is exp(S − row max), P·V divided by its float row sum after (CalibState v4; config.py)
    "rowmax": {"p_row_max": True},
    # three times the optimisation steps per block (PAR rounds scale with it; BRECQ and Q-Diffusion run 20k):
    # far more faithful at 4-bit weights, not better in FID, so not the default (config.py `iters`)
    "iters-3k": {"iters": 3000},
}


def parse_job(text: str) -> tuple[str, str, int]:
    """`preset[@variant]:bits:n_samples` → (preset, bits, n)."""
    try:
        preset, bits, n = text.split(":")
        job = preset, bits, int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"job {text!r}: expected PRESET:BITS:N_SAMPLES, e.g. tcaq:W4A8:10000") from None
    method, _, variant = preset.partition("@")
    if not is_float(method) and method not in METHODS:
        raise argparse.ArgumentTypeError(f"job {text!r}: unknown preset {method!r}; known: fp…, {', '.join(sorted(METHODS))}")
    for name in variant.split(",") if variant else ():
        if name not in VARIANTS:
            raise argparse.ArgumentTypeError(f"job {text!r}: unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    return job


def variant_options(preset: str) -> dict:
    """The calibration options a job's `@variant[,variant…]` adds to its method ({} without one), merged left
    to right — `tcaq@no-par,seed-b` is the no-PAR ablation calibrated on the second trajectories."""
    variant = preset.partition("@")[2]
    return {k: v for name in variant.split(",") if variant for k, v in VARIANTS[name].items()}


def is_float(preset: str) -> bool:
    """Jobs named `fp…` evaluate the full-precision model in the same run (the baseline beside the rows)."""
    return preset.startswith("fp")


def job_commands(preset: str, bits: str, n: int, a: argparse.Namespace, state: Path, eval_dir: Path) -> tuple[list, list]:
    calib = [sys.executable, "-m", "tcaq_kernels", "calibrate", "--method", preset.partition("@")[0], "--bits", bits,
             "--seed", str(CALIB_SEED), "--out", str(state)]
    options = [*a.option, *(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in variant_options(preset).items())]
    for opt in options:
        calib += ["--option", opt]
    ev = [sys.executable, "-m", "tcaq_kernels", "evaluate", *([] if is_float(preset) else ["--state", str(state), "--backend", a.backend]),
          "--n-samples", str(n), "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--out", str(eval_dir),
          "--no-progress"]
    for flag, val in (("--ref-npz", a.ref_npz), ("--resnet-weights", a.resnet_weights), ("--cache-dir", a.cache_dir)):
        if val:
            ev += [flag, val]
    if a.allow_tf32:
        ev.append("--allow-tf32")
    return ([] if is_float(preset) else calib), ev


def portable(cmd: list[str], drop=("--ref-npz", "--resnet-weights", "--cache-dir", "--no-progress")) -> str:
    """The command as a reader runs it: `python`, placeholders for the machine's paths."""
    out, skip = ["python"], False
    for i, part in enumerate(cmd[1:], 1):
        if skip:
            skip = False
            continue
        if part in drop:
            skip = part != "--no-progress"
            continue
        prev = cmd[i - 1]
        out.append("STATE" if prev in ("--state",) or (prev == "--out" and part.endswith(".tcaq"))
                   else "DIR" if prev == "--out" else part)
    return shlex.join(out)


def _counts(values) -> dict | None:
    counts: dict[str, int] = {}
    for v in values:
        counts[str(v)] = counts.get(str(v), 0) + 1
    return dict(sorted(counts.items())) or None


def summarize_state(path: Path) -> dict:
    """What the calibration decided and how long it took, from the state's settings."""
    from tcaq_kernels.quant.state import CalibState

    state = CalibState.load(path)
    s = state.settings
    daq = s.get("daq_table") or {}
    kinds = [rec.get("kind") for recs in daq.values() for rec in (recs if isinstance(recs, list) else [])]
    return {
        "calib_seconds": s.get("calib_seconds"),
        "calib_phase_seconds": s.get("phase_seconds"),
        "calib_device": s.get("device"),
        "timestep_groups": state.num_groups,
        "p_row_norm_layers": sum(l.p_row_norm for l in state.layers.values()),
        "p_row_max_layers": sum(l.p_row_max for l in state.layers.values()),
        "daq_log2_share": round(kinds.count("log2") / len(kinds), 4) if kinds else None,
        "tcr_strength_counts": _counts((s.get("tcr_strength") or {}).values()),
        "par_rounds_kept": s.get("par_rounds_kept"),
        # the guard's numbers per round (fine-energy ratio and PSNR before/after): the states stay on the machine
        "par_guard": [{"round": r["round"], **r["guard"]} for r in s.get("par") or [] if r.get("guard")] or None,
        "state_sha256": sha256_file(path),
        # the tensors alone: equal for two runs that decided the same (the file hash also covers wall times)
        "state_tensors_sha256": state.tensor_digest(),
        "state_bytes": path.stat().st_size,
    }


def job_threads(workers: int, cores: int | None = None) -> int:
    """CPU threads per job when `workers` jobs run at once: the host's cores shared out.

    Every torch process otherwise takes a thread per core for its CPU work (the DAQ fits, the FID
    statistics): three calibrations at once on a 4-GPU host ran their first round 2–7× slower than
    one alone (27 Nov; oversubscription is the suspect, not measured). An OMP_NUM_THREADS already in
    the environment wins."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, workers))


def run_job(job: tuple[str, str, int], gpu: str | None, a: argparse.Namespace, lock: threading.Lock,
            state_locks: dict | None = None) -> dict:
    """Calibrate (unless the state exists and --reuse-states) and evaluate one job; upsert its row.

    `state_locks` (state name → lock) keeps two jobs of one (preset, bits) — say the 10,000- and the 2,000-sample
    rows, both running at once — from calibrating the same state twice: the second waits and reuses it."""
    preset, bits, n = job
    name = f"{preset.replace('+', '_').replace('@', '_').replace(',', '_')}-{bits}"
    with lock:
        state_lock = (state_locks if state_locks is not None else {}).setdefault(name, threading.Lock())
    out = Path(a.out)
    # one state per (preset, bits): with --reuse-states a 2,000-sample row reuses the 10,000-sample row's state
    state, eval_dir, log_path = out / f"{name}.tcaq", out / f"{name}-{n}", out / f"{name}-{n}.log"
    calib, ev = job_commands(preset, bits, n, a, state, eval_dir)
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    env.setdefault("OMP_NUM_THREADS", str(job_threads(len(a.gpus or [None]))))
    seconds = {}
    def step(what: str, cmd: list[str], log) -> None:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        t = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=REPO)
        seconds[what] = round(time.perf_counter() - t, 2)

    with open(log_path, "w") as log:
        if calib:
            with state_lock:
                if not (state.exists() and a.reuse_states):
                    step("calibrate", calib, log)
        step("evaluate", ev, log)
    report = json.loads((eval_dir / "report.json").read_text())
    fidelity = report.get("fidelity") or {}  # absent for float jobs and with --fidelity-samples 0
    row = {
        "preset": preset, "bits": bits, "n_samples": report["n_samples"], "steps": report["steps"],
        "fid_resnet56": report["fid_resnet56"], "is_resnet56": report["is_resnet56"],
        "psnr_vs_fp": report["psnr_vs_fp"], "eps_rel_error": (report.get("eps_rel_error") or {}).get("mean"),
        "fidelity_seeds": fidelity.get("n_seeds"),
        "fine_energy_ratio": (fidelity.get("fine_energy") or {}).get("ratio"),
        "eps_error_shared": (fidelity.get("eps_error_shared") or {}).get("mean"),
        "eps_gain_k": (fidelity.get("eps_gain") or {}).get("k_mean"),
        "eps_rms_own_last": (fidelity.get("eps_rms_ratio_own") or {}).get("last_step"),
        **({} if is_float(preset) else summarize_state(state)),
        "calib_wall_seconds": seconds.get("calibrate"), "eval_seconds": seconds.get("evaluate"),
        "backend": None if is_float(preset) else a.backend, "allow_tf32": a.allow_tf32, "card": report["device"],
        "torch": report["versions"]["torch"], "triton": report["versions"]["triton"],
        "options": variant_options(preset) or None, "code_commit": a.code_commit,
        "command": portable(ev) if is_float(preset) else f"{portable(calib)} && {portable(ev)}",
    }
    if row.get("calib_seconds") is None and not is_float(preset):
        row["calib_seconds"] = seconds.get("calibrate")  # the whole command, model loading included
    with lock:
        upsert_rows(a.results, [with_earlier(row, read_rows(a.results))])
    return row


# What a replaced row keeps of the calibration it replaces (`with_earlier`).
EARLIER_FIELDS = ("fid_resnet56", "psnr_vs_fp", "eps_error_shared", "card", "code_commit", "state_sha256")


def with_earlier(row: dict, old_rows: list[dict]) -> dict:
    """`row` carrying the calibrations it replaces (same preset, bits and n) under "earlier", oldest first.

    One preset's FID moves between calibrations far more than between evaluations (W4A8 qdiffusion: 3.40,
    4.33 and 5.75 from three calibrations, 27 Nov), so a replaced row is a measurement of that spread, not
    clutter. Re-evaluating the same state (equal `state_sha256`) adds nothing."""
    prev = next((r for r in old_rows if (r["preset"], r["bits"], r["n_samples"]) ==
                 (row["preset"], row["bits"], row["n_samples"])), None)
    if prev is None:
        return row
    earlier = list(prev.get("earlier") or [])
    if prev.get("state_sha256") is None or prev.get("state_sha256") != row.get("state_sha256"):
        earlier.append({k: prev.get(k) for k in EARLIER_FIELDS})
    return {**row, "earlier": earlier} if earlier else row


def spread_lines(rows: list[dict]) -> list[str]:
    """Markdown table of every preset with more than one calibration (its row, the rows it replaced and its
    `@seed-b` row): FID of each, mean and range."""
    groups: dict[tuple, list[tuple[float, str]]] = {}
    for r in rows:
        base, _, variant = r["preset"].partition("@")
        others = [v for v in variant.split(",") if v and v != "seed-b"]
        if others:  # an ablation is its own preset: group its calibrations under it
            base = f"{base}@{','.join(others)}"
        variant = "seed-b" if "seed-b" in variant.split(",") else ""
        runs = [(e["fid_resnet56"], e.get("code_commit") or "?") for e in r.get("earlier") or []]
        runs.append((r["fid_resnet56"], (r.get("code_commit") or "?") + (" seed-b" if variant else "")))
        groups.setdefault((r["bits"], base, r["n_samples"]), []).extend(runs)
    multi = {k: v for k, v in groups.items() if len(v) > 1}
    if not multi:
        return []
    lines = ["", "Calibration spread: every calibration of one preset that was evaluated (the current row, the rows it "
             "replaced, and the `@seed-b` row calibrated on other trajectories). A difference between two presets "
             "smaller than these ranges is not a measured difference.", "",
             "| bits | preset | n | FID-ResNet56 of each calibration (code) | mean | range |",
             "| --- | --- | ---: | --- | ---: | ---: |"]
    for (bits, preset, n), runs in sorted(multi.items(), key=lambda kv: (BITS_ORDER.index(kv[0][0])
                                                                         if kv[0][0] in BITS_ORDER else 99, kv[0][1])):
        fids = [f for f, _ in runs]
        lines.append(f"| {bits} | {preset} | {n} | {', '.join(f'{f:.3f} ({c})' for f, c in runs)} | "
                     f"{sum(fids) / len(fids):.3f} | {min(fids):.3f}–{max(fids):.3f} |")
    return lines


def row_summary(row: dict) -> str:
    """One log line for a finished job; a float row has no PSNR and no calibration time."""
    return (f"FID-ResNet56 {row['fid_resnet56']:.3f}, PSNR {_fmt(row.get('psnr_vs_fp'), '.2f')} dB, "
            f"calib {_fmt(row.get('calib_seconds'), '.1f')} s")


def run_all(a: argparse.Namespace) -> list[dict]:
    jobs: "queue.Queue[tuple]" = queue.Queue()
    for job in a.jobs:
        jobs.put(job)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    lock, state_locks, done, failed = threading.Lock(), {}, [], []
    start = time.perf_counter()

    def worker(gpu):
        while True:
            try:
                job = jobs.get_nowait()
            except queue.Empty:
                return
            if a.deadline and time.perf_counter() - start > a.deadline:
                failed.append((job, "not started: past --deadline"))
                continue
            try:
                row = run_job(job, gpu, a, lock, state_locks)
                done.append(row)
                print(f"[gpu {gpu}] {job}: {row_summary(row)}", flush=True)
            except Exception as e:  # one failed job must not stop the others; its log says why
                failed.append((job, repr(e)))
                print(f"[gpu {gpu}] {job}: FAILED {e!r}", flush=True)

    running = Path(a.out) / "RUNNING"
    atomic_write_text(running, f"{os.getpid()}\n")
    threads = [threading.Thread(target=worker, args=(g,)) for g in (a.gpus or [None])]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        running.unlink(missing_ok=True)
    for job, why in failed:
        print(f"not done: {job}: {why}", file=sys.stderr)
    return done


def detached_argv(argv: list[str], a: argparse.Namespace, out: Path) -> list[str]:
    """The runner's own arguments, minus --detach, with the results, markdown and code commit pinned to
    paths and values that do not depend on the (copied) checkout it will run from."""
    argv = [x for x in argv if x != "--detach"]
    return [*argv, "--out", str(out), "--results", str(out / "quality.json"), "--md", str(out / "quality.md"),
            *(["--code-commit", a.code_commit] if a.code_commit else [])]


def detach(argv: list[str], a: argparse.Namespace) -> int:
    """Start the runner from a copy of this checkout in a new session, and return once it runs.

    The copy keeps it alive when the checkout is replaced under it; rows go to OUT/quality.json, seeded
    with the rows of --results so the upserts keep them (copy that file back when the run ends)."""
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if (out / "RUNNING").exists():
        raise SystemExit(f"{out / 'RUNNING'} exists: a runner is already using --out {out}")
    if not (out / "quality.json").exists() and Path(a.results).exists():
        shutil.copyfile(a.results, out / "quality.json")
    code = Path(tempfile.mkdtemp(prefix="tcaq-quality-")) / "repo"
    shutil.copytree(REPO, code, ignore=shutil.ignore_patterns(".*", "out", "__pycache__", "*.tcaq"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")])))
    with open(out / "runner.log", "a") as log:
        proc = subprocess.Popen([sys.executable, str(code / "benchmarks" / "quality.py"), *detached_argv(argv, a, out)],
                                cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    for _ in range(600):  # the marker appears once the runner has parsed its jobs
        if (out / "RUNNING").exists():
            print(f"runner {proc.pid} started from {code}; log {out / 'runner.log'}; wait with --wait SECONDS --out {out}")
            return 0
        if proc.poll() is not None:
            raise SystemExit(f"the runner exited at once (code {proc.returncode}); see {out / 'runner.log'}")
        time.sleep(0.1)
    raise SystemExit(f"the runner did not start within 60 s; see {out / 'runner.log'}")


def wait_for_runner(out: Path, seconds: float, poll: float = 5.0) -> int:
    """Follow a detached runner: echo its log as it grows; 0 once OUT/RUNNING is gone, 3 at the deadline."""
    log, pos, end = out / "runner.log", 0, time.monotonic() + seconds
    while True:
        if log.exists():
            with open(log) as f:
                f.seek(pos)
                sys.stdout.write(f.read())
                pos = f.tell()
            sys.stdout.flush()
        if not (out / "RUNNING").exists():
            return 0
        if time.monotonic() >= end:
            print(f"still running after {seconds:.0f} s (OUT/RUNNING exists)")
            return 3
        time.sleep(min(poll, max(end - time.monotonic(), 0.01)))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def render_markdown(rows: list[dict]) -> str:
    """The table of every quantized row beside the full-precision one, grouped by bit width."""
    fp = next((r for r in rows if r["preset"] == "fp"), None)
    fp_tf32 = {r["n_samples"]: r for r in rows if r["preset"] == "fp-tf32"}
    fp_by_n = {r["n_samples"]: r for r in rows if r["preset"] == "fp"}
    quant = [r for r in rows if r["preset"] not in ("fp", "test-images-floor")]  # fp-tf32 is listed with them
    quant.sort(key=lambda r: (BITS_ORDER.index(r["bits"]) if r["bits"] in BITS_ORDER else 99, -r["n_samples"], r["preset"]))
    lines = [
        "# Quality table: FID-ResNet56 of the reference model per preset and bit width",
        "",
        "DDIM-100 (eta 0) samples of `tcaq_kernels/models/ddpm-cifar10-small`, sample i from seed i, scored "
        "against the 10,000 CIFAR-10 test images in the ResNet-56 feature space (not comparable with a paper's "
        "Inception FID). PSNR: final images against the full-precision model's on the same seeds (the first 64); "
        "calibration seeds start at 1,000,000. Δ: FID change against the full-precision row of the same "
        "arithmetic and sample count (`fp-tf32` for rows evaluated with TF32, whose integer products are exact in "
        "TF32; `fp` otherwise); FID is biased by the sample count, so rows compare only at equal n. "
        "ε error: mean per-step relative error of the noise prediction on the full-precision trajectory (same "
        "64 seeds); ε shared: the part of it common to all seeds (‖mean over seeds‖ / mean ‖·‖; ≈ 1/8 for errors "
        "unrelated across 64 seeds, 1 for a bias every sample gets); ε RMS own: RMS of the quantized model's ε at the last step of its own trajectory over full precision's on its own (> 1: it keeps removing 'noise' that is image — faded samples); fine energy: mean squared neighbour "
        "difference of the final images against full precision's (> 1: grain).",
        "",
        "| bits | preset | n | FID-ResNet56 | Δ vs fp | PSNR vs fp (dB) | ε error | ε shared | ε RMS own | fine energy × fp | calib (s) | card | code | state sha256 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    if fp:
        lines.append(f"| fp | fp | {fp['n_samples']} | {fp['fid_resnet56']:.3f} | — | — | — | — | — | — | — | {fp['card']} | "
                     f"{fp.get('code_commit') or '—'} | — |")
    for r in quant:
        # the full-precision row of the same arithmetic and the same n (FID is biased by n)
        base = (fp_tf32 if r.get("allow_tf32") and r["n_samples"] in fp_tf32 else fp_by_n).get(r["n_samples"])
        comparable = base is not None and base is not r
        delta = 100 * (r["fid_resnet56"] / base["fid_resnet56"] - 1) if comparable else None
        lines.append(
            f"| {r['bits']} | {r['preset']} | {r['n_samples']} | {r['fid_resnet56']:.3f} | "
            f"{_fmt(delta, '+.1f')}{'' if delta is None else ' %'} | {_fmt(r.get('psnr_vs_fp'), '.2f')} | "
            f"{_fmt(r.get('eps_rel_error'), '.4f')} | {_fmt(r.get('eps_error_shared'), '.2f')} | {_fmt(r.get('eps_rms_own_last'), '.2f')} | "
            f"{_fmt(r.get('fine_energy_ratio'), '.3f')} | "
            f"{_fmt(r.get('calib_seconds'), '.0f')}{'*' if r.get('note') else ''} | {r.get('card', '—')}"
            f"{' (TF32)' if r.get('allow_tf32') else ''} | {r.get('code_commit') or '—'} | "
            f"`{(r.get('state_sha256') or '—')[:12]}` |")
    if any(r.get("allow_tf32") and r["n_samples"] not in fp_tf32 for r in quant):
        lines += ["", "Δ of a TF32 row without an `fp-tf32` row of its sample count is against the fp32 `fp` row of "
                  "that count (— where there is none)."]
    lines += spread_lines(rows)
    grids = sorted(Path(MARKDOWN.parent / "quality-grids").glob("*.png"))
    if grids:
        lines += ["", "Same-seed grids (full precision left, quantized right, first 64 seeds): "
                  + ", ".join(f"[{g.stem}](quality-grids/{g.name})" for g in grids) + "."]
    notes: dict[str, list[str]] = {}  # one line per distinct note, naming the rows it applies to
    for r in quant:
        if r.get("note"):
            notes.setdefault(r["note"], []).append(f"{r['bits']} {r['preset']} (n={r['n_samples']})")
    if notes:
        lines += [""] + [f"\\* {', '.join(labels)}: {note}." for note, labels in notes.items()]
    lines += ["", "Commands (one per row):", ""]
    for r in quant:
        lines.append(f"- {r['bits']} {r['preset']}{' ' + json.dumps(r['options']) if r.get('options') else ''} (n={r['n_samples']}, backend {r.get('backend')}, torch "
                     f"{r.get('torch')}, triton {r.get('triton')}, code {r.get('code_commit', '?')}): `{r['command']}`")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", nargs="*", type=parse_job, default=[], help="PRESET:BITS:N_SAMPLES …")
    p.add_argument("--gpus", nargs="*", default=None,
                   help="CUDA device indices, one job at a time per entry. An index may be repeated, but two jobs on one "
                        "GPU time-slice it: measured on an H200, qdiffusion calibration took 3.5x and tcaq ~20x as long "
                        "(many small synchronising steps), evaluation 2x")
    p.add_argument("--out", default="out/quality", help="states, evaluation folders and logs")
    p.add_argument("--backend", default="simulate", choices=("reference", "simulate", "triton"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=2000)
    p.add_argument("--allow-tf32", action="store_true",
                   help="TF32 matmuls/convs in the evaluation (integer codes of up to 8 bits times 8-bit weights are exact in TF32)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="calibration option for every job")
    p.add_argument("--deadline", type=float, default=None, help="start no job after this many seconds")
    p.add_argument("--reuse-states", action="store_true", help="skip calibration where the state file exists")
    p.add_argument("--ref-npz", default=None)
    p.add_argument("--resnet-weights", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--code-commit", default=_git_commit(),
                   help="commit recorded in each row (default: this checkout's HEAD; pass it when running from a copy without .git)")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--md", default=str(MARKDOWN))
    p.add_argument("--render", action="store_true", help="only rewrite the markdown from the results file")
    p.add_argument("--detach", action="store_true",
                   help="run from a copy of the code in a new session and return at once (rows to OUT/quality.json)")
    p.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                   help="follow the runner of --out for at most SECONDS; exit 0 when it has finished, 3 if it still runs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    if a.wait is not None:
        return wait_for_runner(Path(a.out), a.wait)
    if a.detach:
        if not a.jobs:
            raise SystemExit("--detach needs --jobs")
        return detach(argv, a)
    if not a.render:
        if not a.jobs:
            raise SystemExit("no --jobs given (or pass --render to rewrite the table only)")
        run_all(a)
    atomic_write_text(Path(a.md), render_markdown(read_rows(a.results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
