"""Command line: `python -m tcaq_kernels quickstart|calibrate|inspect|evaluate …`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .calib.settings import SUPPORTED_BITS


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="diffusers DDIMPipeline folder (default: the embedded DDPM-CIFAR10 model)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def _device(name):
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _load(model_dir, device):
    from .eval.loading import load_fp_unet, load_scheduler_config
    from .sampling import make_scheduler

    return load_fp_unet(model_dir, device=device), make_scheduler(load_scheduler_config(model_dir))


def _load_text_pipeline(model_dir, device):
    """A text-to-image pipeline folder (diffusers' StableDiffusionPipeline and kin: a UNet, a scheduler and a text
    encoder behind `encode_prompt`) on `device`."""
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(model_dir)
    except ImportError as e:  # its text encoder's library (transformers) is not a dependency of this package
        raise SystemExit(f"--prompts: loading the pipeline at {model_dir} needs its text encoder's library: {e}")
    return pipe.to(device)


def _read_prompts(path) -> list[str]:
    prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"--prompts {path}: no prompt in the file (one a line)")
    return prompts


def cmd_calibrate(args) -> int:
    import tcaq_kernels

    options = dict(num_samples=args.samples, num_steps=args.steps, seed=args.seed, batch_size=args.batch_size)
    if args.groups is not None:  # else the method's own default (1 for minmax, 10 for tcaq)
        options["timestep_groups"] = args.groups
    options.update(_method_options(args.option))
    if args.prompts:  # a text-conditional pipeline, calibrated on these prompts with classifier-free guidance
        if not args.model:
            raise SystemExit("--prompts needs --model: a text-to-image pipeline folder (e.g. Stable Diffusion's)")
        prompts = _read_prompts(args.prompts)
        model = _load_text_pipeline(args.model, _device(args.device))
        options.update(prompts=prompts, negative_prompt=args.negative_prompt, guidance_scale=args.guidance_scale)
        scheduler = None  # the pipeline's
    else:
        if args.negative_prompt is not None:
            raise SystemExit("--negative-prompt goes with --prompts")
        model, scheduler = _load(args.model, _device(args.device))
    start = time.perf_counter()
    state = tcaq_kernels.calibrate(model, scheduler=scheduler, bits=args.bits, method=args.method, **options)
    path = state.save(args.out)
    print(f"calibrated {len(state.layers)} layers ({args.method} {args.bits}, {state.num_groups} timestep groups) "
          f"in {time.perf_counter() - start:.1f} s → {path}")
    return 0


def _method_options(pairs) -> dict:
    """`KEY=VALUE` pairs → method options; VALUE is read as JSON (numbers, true/false, null, lists), else as text."""
    options = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option {pair!r}: expected KEY=VALUE, e.g. --option iters=500")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def cmd_inspect(args) -> int:
    from .quant.state import CalibState

    state = CalibState.load(args.state)
    kinds = {}
    for layer in state.layers.values():
        kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
    weight_bytes = sum(l.weight.numel() for l in state.layers.values() if l.weight is not None)
    summary = {
        "file": str(args.state), "version": state.version, "method": state.method, "bits": state.bits,
        "timestep_groups": state.num_groups, "group_edges": state.group_edges, "layers": kinds,
        "float_layers": state.float_layers, "integer_weight_bytes": weight_bytes,
        "model_fingerprint": state.model_fingerprint, "settings": state.settings,
    }
    if args.model is not None or args.validate:
        unet, _ = _load(args.model, "cpu")
        state.validate(unet)
        summary["valid_for_model"] = True
    print(json.dumps(summary, indent=2))
    return 0


def cmd_quickstart(args) -> int:
    """Min-max calibration → convert → same-seed samples and PSNR against full precision."""
    import torch

    import tcaq_kernels

    from .eval.fidelity import same_seed_fidelity
    from .eval.grid import save_comparison_grid

    torch.manual_seed(0)
    device = _device(args.device)
    out = Path(args.out)
    unet, scheduler = _load(args.model, device)
    t0 = time.perf_counter()
    state = tcaq_kernels.calibrate(
        unet, scheduler=scheduler, bits=args.bits, num_samples=args.calib_samples, num_steps=args.calib_steps,
        timestep_groups=args.groups, batch_size=args.calib_samples,
    )
    state_path = state.save(out / f"state-{args.bits.lower()}.tcaq")
    t_calib = time.perf_counter() - t0
    qunet = tcaq_kernels.convert(unet, state, backend=args.backend)
    seeds = list(range(args.seed, args.seed + args.n))
    result = same_seed_fidelity(unet, qunet, scheduler, seeds, num_steps=args.steps, batch_size=args.n)
    grid = save_comparison_grid(out / "grid.png", result.ref_images, result.test_images,
                                test_label=f"{args.bits} min-max ({args.backend})", nrow=4)
    report = {
        "bits": args.bits, "backend": args.backend, "calib_seconds": round(t_calib, 2), "state": str(state_path),
        "grid": str(grid), "n": args.n, "ddim_steps": args.steps,
        "psnr_vs_fp_db": float(result.psnr.mean()), "eps_rel_error_mean": float(result.eps_rel_error.mean()),
    }
    (out / "quickstart.json").write_text(json.dumps(report, indent=2))
    print(f"calibration: {t_calib:.1f} s → {state_path}")
    print(f"grid (full precision | {args.bits}): {grid}")
    print(f"same-seed PSNR vs full precision over {args.n} samples, DDIM-{args.steps}: {report['psnr_vs_fp_db']:.2f} dB "
          f"(mean per-step noise-prediction relative error {report['eps_rel_error_mean']:.4f})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tcaq_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quickstart", help="calibrate (min-max), convert, sample a grid, print PSNR vs full precision")
    _add_model(q)
    q.add_argument("--bits", default="W8A8", choices=SUPPORTED_BITS)
    q.add_argument("--backend", default="reference", choices=("reference", "simulate", "triton"))
    q.add_argument("--calib-samples", type=int, default=8)
    q.add_argument("--calib-steps", type=int, default=20, help="DDIM steps of the calibration trajectories")
    q.add_argument("--groups", type=int, default=4, help="timestep groups (activation parameter sets)")
    q.add_argument("--n", type=int, default=16, help="samples in the grid and the PSNR (4×4 by default)")
    q.add_argument("--steps", type=int, default=20, help="DDIM steps for sampling")
    q.add_argument("--seed", type=int, default=1000, help="first sampling seed (kept apart from calibration seeds)")
    q.add_argument("--out", default="quickstart-out")
    q.set_defaults(func=cmd_quickstart)

    c = sub.add_parser("calibrate", help="calibrate a model and write a CalibState")
    _add_model(c)
    c.add_argument("--bits", default="W8A8", choices=SUPPORTED_BITS)
    from .calib import METHODS

    c.add_argument("--method", default="minmax", choices=sorted(METHODS), help="calibration method (calib/presets.py)")
    c.add_argument("--samples", type=int, default=64, help="calibration trajectories")
    c.add_argument("--steps", type=int, default=100, help="DDIM steps of the calibration trajectories")
    c.add_argument("--groups", type=int, default=None, help="timestep groups (default: the method's own)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="method option (calib/config.py MethodConfig), repeatable: --option iters=500 --option par_rounds=1")
    c.add_argument("--prompts", default=None, metavar="FILE",
                   help="a text file of prompts, one a line: --model is then a text-to-image pipeline folder "
                        "(Stable Diffusion), calibrated on these prompts with classifier-free guidance")
    c.add_argument("--negative-prompt", default=None, help="with --prompts: the guidance's negative prompt")
    c.add_argument("--guidance-scale", type=float, default=7.5, help="with --prompts (default 7.5; 1: no guidance)")
    c.add_argument("--out", required=True, help="CalibState file to write (atomically)")
    c.set_defaults(func=cmd_calibrate)

    i = sub.add_parser("inspect", help="summarise a CalibState (and validate it against a model)")
    i.add_argument("state")
    i.add_argument("--model", default=None)
    i.add_argument("--validate", action="store_true", help="validate against --model (default: the embedded model)")
    i.set_defaults(func=cmd_inspect)

    from .eval.cli import add_evaluate_parser, run_evaluate

    add_evaluate_parser(sub).set_defaults(func=run_evaluate)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
