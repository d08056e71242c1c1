"""The full-precision quality row: FID-ResNet56 and the IS-like score of the reference model.

10,000 DDIM-100 samples (eta 0, sample i from seed i, fp32 UNet with TF32 off) of the embedded
reference model, scored against the 10,000 CIFAR-10 test images; plus the floor (test half vs the
disjoint half, even vs odd indices). It writes two rows into `benchmarks/results/quality.json`
(`preset` "fp" and "test-images-floor"; rows of other presets are kept) and
`benchmarks/results/quality_fp.md`.

Command, on a GPU machine from the repository root (shared/ files where `tcaq_kernels.eval.data`
finds them, or passed explicitly):

    python benchmarks/eval_fp.py --batch-size 2000 --out out/eval-fp

It goes through `python -m tcaq_kernels evaluate` (the same code path every quantized row uses), so
the row is comparable with theirs; the samples folder is resumable if the run is interrupted.
`--check-determinism` regenerates the first shard into a second folder and compares it bit for bit.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("tcaq_kernels") is None:  # not installed: use this checkout
    sys.path.insert(0, str(REPO))

from tcaq_kernels.atomic import atomic_write_text  # noqa: E402
from tcaq_kernels.eval.cli import build_parser, evaluate  # noqa: E402
from tcaq_kernels.eval.results import upsert_rows  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/eval-fp", help="working folder (samples, report.json, grid.png)")
    p.add_argument("--n-samples", type=int, default=10000)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=2000)
    p.add_argument("--allow-tf32", action="store_true", help="TF32 convs (default: true fp32)")
    p.add_argument("--ref-npz", default=None)
    p.add_argument("--resnet-weights", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "quality.json"))
    p.add_argument("--md", default=str(REPO / "benchmarks" / "results" / "quality_fp.md"))
    p.add_argument("--copy-to", default=None, help="also copy report.json and grid.png here")
    p.add_argument("--check-determinism", action="store_true")
    return p.parse_args(argv)


def canonical_command(a: argparse.Namespace) -> str:
    """The command that reproduces the numbers (output locations left at their defaults)."""
    parts = ["python", "benchmarks/eval_fp.py", "--n-samples", str(a.n_samples), "--steps", str(a.steps),
             "--batch-size", str(a.batch_size)]
    return shlex.join(parts + (["--allow-tf32"] if a.allow_tf32 else []))


def check_determinism(a: argparse.Namespace, first_shard: Path) -> dict:
    """Regenerate shard 0 in a fresh folder; report whether the images are bit-identical."""
    import torch

    from tcaq_kernels.eval.generate import generate_samples, shard_name
    from tcaq_kernels.eval.loading import load_fp_unet, load_scheduler_config

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet = load_fp_unet(None, device=dev)
    again = Path(a.out) / "determinism"
    shutil.rmtree(again, ignore_errors=True)
    t = time.perf_counter()
    generate_samples(unet, load_scheduler_config(None), again, a.n_samples, num_steps=a.steps,
                     batch_size=a.batch_size, max_shards=1, progress=False)
    with np.load(first_shard) as x, np.load(again / shard_name(0)) as y:
        same = bool(np.array_equal(x["images"], y["images"]) and np.array_equal(x["seeds"], y["seeds"]))
        n_diff = int((x["images"] != y["images"]).any(axis=(1, 2, 3)).sum())
        n = int(len(x["seeds"]))
    return {"first_shard_identical": same, "images_differing": n_diff, "n": n, "seconds": time.perf_counter() - t}


def portable_command(cmd: str) -> str:
    """`cmd` without the machine-specific paths (output folder, shared-file copies, cache)."""
    drop = {"--out", "--ref-npz", "--resnet-weights", "--cache-dir"}
    parts, out = shlex.split(cmd), []
    if "--state" not in parts:
        drop.add("--backend")  # meaningless without a state
    it = iter(parts)
    for p in it:
        if p in drop:
            next(it, None)
        else:
            out.append(p)
    return shlex.join(out)


def render_markdown(fp: dict, floor: dict, report: dict, det: dict | None) -> str:
    v = report["versions"]
    inception = report.get("inception_fid", {})
    if inception.get("available"):
        inception_note = f"Inception FID (pytorch-fid weights found locally): {inception['fid_inception']:.3f}."
    else:
        inception_note = "Inception-v3 weights are not on these machines, so no Inception FID was computed."
    lines = [
        "# Full-precision quality row (FID-ResNet56)",
        "",
        "Reference model `tcaq_kernels/models/ddpm-cifar10-small` (fp32 UNet, TF32 "
        + ("on" if report["allow_tf32"] else "off") + f"), DDIM {report['steps']} steps, eta 0, sample i from seed i "
        f"(seeds {report['seeds']['first']}…{report['seeds']['last']}), scored against the 10,000 CIFAR-10 test "
        "images (`shared/data/cifar10-test-jpeg.npz`) in the 64-d pooled feature space of the CIFAR ResNet-56 "
        "(`shared/models/resnet56-cifar10`). Not comparable with a paper's Inception FID. " + inception_note,
        "",
        "| row | n | FID-ResNet56 | IS-like (ResNet-56 softmax, 10 splits) |",
        "| --- | ---: | ---: | ---: |",
        f"| fp (generated) | {fp['n_samples']} | {fp['fid_resnet56']:.4f} | {fp['is_resnet56']:.3f} ± {fp['is_resnet56_std']:.3f} |",
        f"| test-images floor (even vs odd test indices) | 5000 vs 5000 | {floor['fid_resnet56']:.4f} | "
        f"{floor['is_resnet56']:.3f} ± {floor['is_resnet56_std']:.3f} (all 10,000 test images) |",
        "",
        f"- card: {fp['card']}",
        f"- time: {fp['seconds']:.1f} s in all, of which sampling {fp['sampling_seconds']:.1f} s "
        f"({fp['n_samples'] * report['steps'] / fp['sampling_seconds']:.0f} UNet sample-steps/s, batch {report['sampling']['batch_size']})",
        f"- versions: torch {v['torch']} (CUDA {v['cuda']}), triton {v['triton']}, diffusers {v['diffusers']}, "
        f"numpy {v['numpy']}, Python {v['python']}",
        f"- command: `{fp['command']}`",
        f"- same as: `{portable_command(report['command'])} --out DIR` (shared files at their default place)",
    ]
    if det is not None:
        lines.append("- determinism: shard 0 regenerated in a fresh folder on the same card was "
                     + ("bit-identical" if det["first_shard_identical"] else f"NOT identical ({det['images_differing']} images differ)"))
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    ev = ["evaluate", "--out", a.out, "--n-samples", str(a.n_samples), "--steps", str(a.steps),
          "--batch-size", str(a.batch_size), "--is-splits", "10"]
    for flag, val in (("--ref-npz", a.ref_npz), ("--resnet-weights", a.resnet_weights), ("--cache-dir", a.cache_dir)):
        if val:
            ev += [flag, val]
    if a.allow_tf32:
        ev.append("--allow-tf32")
    report = evaluate(build_parser().parse_args(ev))
    card = report["device"]
    fp = {"preset": "fp", "bits": "fp", "n_samples": report["n_samples"], "steps": report["steps"],
          "fid_resnet56": report["fid_resnet56"], "is_resnet56": report["is_resnet56"],
          "is_resnet56_std": report["is_resnet56_std"], "card": card, "seconds": report["seconds"],
          "sampling_seconds": report["seconds_by_phase"]["sampling"],
          "dtype": "fp32, TF32 " + ("on" if a.allow_tf32 else "off"),
          "torch": report["versions"]["torch"], "triton": report["versions"]["triton"],
          "command": canonical_command(a)}
    fl = report["floor"]
    floor = {"preset": "test-images-floor", "bits": "fp", "n_samples": fl["n_a"], "fid_resnet56": fl["fid_resnet56"],
             "is_resnet56": fl["is_resnet56"], "is_resnet56_std": fl["is_resnet56_std"], "card": card,
             "seconds": None, "split": fl["split"], "command": canonical_command(a)}
    det = check_determinism(a, Path(a.out) / "samples" / "shard-000000.npz") if a.check_determinism else None
    if det is not None:
        fp["determinism"] = det
    upsert_rows(a.results, [fp, floor])
    atomic_write_text(a.md, render_markdown(fp, floor, report, det))
    if a.copy_to:
        for name in ("report.json", "grid.png"):
            shutil.copy(Path(a.out) / name, Path(a.copy_to) / name)
    print(json.dumps({"fp": fp, "floor": floor}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
