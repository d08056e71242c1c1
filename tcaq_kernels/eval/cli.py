"""`python -m tcaq_kernels evaluate`: sample, score and compare a model, and write a JSON report + grid.

    python -m tcaq_kernels evaluate --model DIR [--state FILE --backend reference] \\
        --n-samples 10000 --steps 100 --batch-size 1000 --out DIR

writes into DIR: `samples/` (resumable shards), `report.json` and `grid.png` (8×8, full precision
beside the evaluated model for the same seeds). With `--state` the UNet is converted by
`tcaq_kernels.convert` and compared with its full-precision original on the first
`--fidelity-samples` seeds (per-step eps error on the reference trajectory, final-image PSNR/MSE).
Under `torchrun --nproc_per_node=N` the sampling is split across the ranks and rank 0 scores.

The report records everything needed to reproduce it: the command, seeds, device, versions.
"""
from __future__ import annotations

import argparse
import platform
import shlex
import time
from pathlib import Path

import numpy as np
import torch

BACKENDS = ("reference", "simulate", "triton")


def _add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default=None, help="diffusers DDIMPipeline folder (default: the embedded reference model)")
    p.add_argument("--state", default=None, help="CalibState file: evaluate the UNet converted with it")
    p.add_argument("--backend", default="reference", choices=BACKENDS, help="convert backend (with --state)")
    p.add_argument("--out", required=True, help="output folder (samples/, report.json, grid.png)")
    p.add_argument("--n-samples", type=int, default=10000, help="samples for FID-ResNet56 (default 10000)")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps, eta 0 (default 100)")
    p.add_argument("--batch-size", type=int, default=256, help="sampling batch size")
    p.add_argument("--shard-size", type=int, default=None, help="samples per resumable shard (default: batch size)")
    p.add_argument("--seed-base", type=int, default=0, help="sample i uses seed SEED_BASE + i")
    p.add_argument("--fidelity-samples", type=int, default=64, help="seeds for the same-seed comparison with --state")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present; the rank's GPU under torchrun)")
    p.add_argument("--allow-tf32", action="store_true", help="let fp32 convs/matmuls use TF32 (off: true fp32)")
    p.add_argument("--ref-npz", default=None, help="CIFAR-10 test npz (default: shared/data/cifar10-test-jpeg.npz)")
    p.add_argument("--resnet-weights", default=None, help="ResNet-56 checkpoint (default: shared/models/resnet56-cifar10/…)")
    p.add_argument("--cache-dir", default=None, help="reference-feature cache (default: $TCAQ_CACHE or ~/.cache/tcaq_kernels)")
    p.add_argument("--is-splits", type=int, default=10, help="splits of the IS-like score")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Register `evaluate` on a subparsers object; the parser's `func` default is `run_evaluate`."""
    p = subparsers.add_parser("evaluate", help="FID-ResNet56, IS-like score and same-seed fidelity of a model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run_evaluate)
    return p


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser with only `evaluate` (for tests and scripts)."""
    parser = argparse.ArgumentParser(prog="python -m tcaq_kernels")
    add_evaluate_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def command_line(args: argparse.Namespace) -> str:
    """The full command that reproduces `args`, every option spelled out."""
    parts = ["python", "-m", "tcaq_kernels", "evaluate"]
    for action in _add_arguments(argparse.ArgumentParser())._actions:
        if not action.option_strings or action.dest == "help" or (action.dest == "backend" and not args.state):
            continue
        value = getattr(args, action.dest, None)
        if isinstance(action, argparse._StoreTrueAction):
            if value:
                parts.append(action.option_strings[0])
        elif value is not None:
            parts += [action.option_strings[0], str(value)]
    return shlex.join(parts)


def environment(device: torch.device) -> dict:
    """Device name and library versions, for the report."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import diffusers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": name,
        "versions": {"torch": torch.__version__, "triton": triton_version, "diffusers": diffusers.__version__,
                     "numpy": np.__version__, "python": platform.python_version(),
                     "cuda": torch.version.cuda},
    }


def evaluate(args: argparse.Namespace) -> dict | None:
    """Run the evaluation `args` describe; returns the report on rank 0 (None on other ranks)."""
    from ..atomic import atomic_write_json
    from .fid import fid_resnet56, floor_resnet56, inception_fid, inception_fid_status, reference_features
    from .fidelity import same_seed_fidelity
    from .generate import generate_samples, init_distributed, load_samples
    from .grid import save_comparison_grid
    from .loading import convert_unet, load_calib_state, load_fp_unet, load_scheduler_config, resolve_model_dir
    from .resnet56 import load_resnet56

    for name in ("n_samples", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    t_start = time.perf_counter()
    phases: dict[str, float] = {}
    out = Path(args.out)
    rank, world, device = init_distributed()
    if args.device is not None:
        device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = bool(args.allow_tf32)
    torch.backends.cudnn.allow_tf32 = bool(args.allow_tf32)
    progress = not args.no_progress

    model_dir = resolve_model_dir(args.model)
    fp_unet = load_fp_unet(model_dir, device=device)
    sched = load_scheduler_config(model_dir)
    test_unet = fp_unet
    if args.state:
        test_unet = convert_unet(fp_unet, load_calib_state(args.state), args.backend)

    t = time.perf_counter()
    gen = generate_samples(
        test_unet, sched, out / "samples", args.n_samples, seed_base=args.seed_base, num_steps=args.steps,
        batch_size=args.batch_size, shard_size=args.shard_size, rank=rank, world_size=world, progress=progress,
        meta_extra={"model": str(model_dir.resolve()), "state": args.state, "backend": args.backend if args.state else None},
    )
    phases["sampling"] = time.perf_counter() - t
    if rank != 0:
        return None

    t = time.perf_counter()
    images, seeds = load_samples(out / "samples")
    ref = reference_features(args.ref_npz, args.resnet_weights, args.cache_dir, device=device, progress=progress)
    resnet = load_resnet56(args.resnet_weights, device=device)
    quality = fid_resnet56(images, ref, model=resnet, device=device, is_splits=args.is_splits, progress=progress)
    floor = floor_resnet56(ref, is_splits=args.is_splits)
    phases["scoring"] = time.perf_counter() - t

    n_grid = min(64, len(images))
    fidelity = None
    fp_grid = images[:n_grid]
    if args.state and args.fidelity_samples > 0:
        t = time.perf_counter()
        fseeds = range(args.seed_base, args.seed_base + min(args.fidelity_samples, args.n_samples))
        res = same_seed_fidelity(fp_unet, test_unet, sched, fseeds, args.steps, args.batch_size, progress)
        fidelity = res.summary()
        phases["fidelity"] = time.perf_counter() - t
        if len(res.ref_images) >= n_grid:
            fp_grid = res.ref_images[:n_grid]
    elif args.state:
        from ..sampling import sample_uint8

        fp_grid = sample_uint8(fp_unet, sched, seeds[:n_grid].tolist(), args.steps, batch_size=n_grid)
    grid_path = save_comparison_grid(
        out / "grid.png", fp_grid, images[:n_grid] if args.state else None,
        test_label=f"{Path(args.state).name} ({args.backend})" if args.state else "evaluated",
    )

    ok, why = inception_fid_status()
    if ok:
        from .data import load_cifar10_test

        inception = inception_fid(images, load_cifar10_test(args.ref_npz)[0], device=device)
    else:
        inception = {"available": False, "reason": why}

    report = {
        "model": str(model_dir),
        "state": args.state,
        "backend": args.backend if args.state else None,
        "n_samples": int(len(images)),
        "steps": args.steps,
        "eta": 0.0,
        "seeds": {"base": args.seed_base, "count": int(len(seeds)), "first": int(seeds[0]), "last": int(seeds[-1]),
                  "rule": "sample i starts from seeded_noise(seed_base + i)"},
        "fid_resnet56": quality["fid_resnet56"],
        "is_resnet56": quality["is_resnet56"],
        "is_resnet56_std": quality["is_resnet56_std"],
        "is_splits": quality["is_splits"],
        "floor_fid_resnet56": floor["fid_resnet56"],
        "floor": floor,
        "reference": {"n_images": int(len(ref.features)), "cache": str(ref.cache_path) if ref.cache_path else None,
                      "key": ref.key},
        "psnr_vs_fp": fidelity["psnr_db"] if fidelity else None,
        "mse_vs_fp": fidelity["mse"] if fidelity else None,
        "eps_rel_error": fidelity["eps_rel_error"] if fidelity else None,
        "fidelity": fidelity if fidelity else {"skipped": "no --state: the evaluated model is full precision"
                                               if not args.state else "--fidelity-samples 0"},
        "inception_fid": inception,
        "grid": grid_path.name,
        "samples_dir": "samples",
        "sampling": {"world_size": world, "shards_total": gen.shards_total, "shards_generated_by_rank0": gen.shards_done,
                     "shards_skipped_by_rank0": gen.shards_skipped, "batch_size": args.batch_size},
        "allow_tf32": bool(args.allow_tf32),
        **environment(device),
        "seconds_by_phase": phases,
        "seconds": time.perf_counter() - t_start,
        "command": command_line(args) if world == 1 else f"torchrun --nproc_per_node={world} -m tcaq_kernels "
                   + command_line(args).split(" -m tcaq_kernels ", 1)[1],
    }
    atomic_write_json(out / "report.json", report)
    return report


def run_evaluate(args: argparse.Namespace) -> int:
    """Entry point for `python -m tcaq_kernels evaluate`; prints the headline numbers, returns 0."""
    report = evaluate(args)
    if report is not None:
        line = f"FID-ResNet56 {report['fid_resnet56']:.3f}  IS-like {report['is_resnet56']:.3f}"
        if report["psnr_vs_fp"] is not None:
            line += f"  PSNR vs fp {report['psnr_vs_fp']:.2f} dB  eps rel err {report['eps_rel_error']['mean']:.4f}"
        print(f"{line}  ({report['n_samples']} samples, {report['seconds']:.1f} s) → {Path(args.out) / 'report.json'}")
    return 0
