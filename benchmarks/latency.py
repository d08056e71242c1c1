"""End-to-end UNet latency and weight memory: full precision and quantized, side by side, one run.

    python benchmarks/latency.py --batch 64 256 --out benchmarks/results

on a CUDA machine (diffusers installed). Every row of one invocation is measured on the same card
in the same process: fp32 and bf16 eager, bf16 replayed from one CUDA graph, bf16 `torch.compile` (eager
and from CUDA graphs), and the converted W8A8 / W4A8 models (`backend="triton"`; convert's default
`fuse_norm=True`, and `fuse_norm=False` rows beside them) eager and from CUDA graphs (the "CUDA graph"
rows call the model through `tcaq_kernels.cuda_graphed`, input copies and output copy included). One "step"
is one UNet forward at the given batch; times are medians of CUDA-event-timed repeats after
warm-up, on random (never zero) inputs. The quantized states are min-max with 4 timestep groups
from a small calibration budget — the speed does not depend on how the scales were chosen, but it
does on the state's layout: `--split-skip` calibrates as the `qdiffusion`/`tcaq` presets do, with the
up blocks' skip concatenations split between two input quantizers (24 layers of the embedded model,
each one conv kernel with an int32 sum per channel range).
Writes latency.json (rows) and latency.md (a table with ratios against bf16 eager and bf16 from CUDA
graphs).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tcaq_kernels  # noqa: E402
from tcaq_kernels.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from tcaq_kernels.eval.loading import load_fp_unet, load_scheduler_config  # noqa: E402
from tcaq_kernels.sampling import make_scheduler  # noqa: E402


def median_ms(fn, warmup: int = 3, repeat: int = 20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def speed_states(fp32, scheduler, bits, split_skip: bool = False) -> dict:
    """{bits: min-max state} from a small budget, 4 timestep groups — the states the speed benchmarks
    (this file, step_profile.py) convert; `split_skip` gives the layout of the qdiffusion/tcaq presets."""
    return {b: tcaq_kernels.calibrate(fp32, scheduler=scheduler, bits=b, num_samples=32, num_steps=20,
                                      timestep_groups=4, batch_size=32, progress=False, split_skip=split_skip)
            for b in bits}


def model_bytes(model) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--bits", nargs="+", default=["W8A8", "W4A8"])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--fuse-norm", choices=("both", "on", "off"), default="both",
                        help="convert(fuse_norm=…) of the quantized rows: GroupNorm+SiLU+quantize as one kernel "
                             "(convert's default), the unfused path ('fuse_norm=False' rows), or both (default)")
    parser.add_argument("--split-skip", action="store_true",
                        help="states with split skip inputs, the layout of the qdiffusion/tcaq presets (default: off)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("latency.py measures GPU latency: no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    card = torch.cuda.get_device_name()
    fp32 = load_fp_unet(args.model, device="cuda")
    scheduler = make_scheduler(load_scheduler_config(args.model))
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    states = speed_states(fp32, scheduler, args.bits, args.split_skip)
    fuse_options = {"both": (True, False), "on": (True,), "off": (False,)}[args.fuse_norm]
    quantized = {f"{b} triton" + ("" if fuse else " fuse_norm=False"):
                 tcaq_kernels.convert(bf16, s, backend="triton", fuse_norm=fuse)
                 for b, s in states.items() for fuse in fuse_options}
    compiled = None if args.no_compile else torch.compile(copy.deepcopy(bf16))
    rows = []
    for batch in args.batch:
        shape = (batch, fp32.config.in_channels, fp32.config.sample_size, fp32.config.sample_size)
        x32 = torch.randn(shape, device="cuda")
        x16 = x32.to(torch.bfloat16)
        t = torch.tensor(500, device="cuda")
        variants = [("fp32 eager", fp32, x32, False), ("bf16 eager", bf16, x16, False),
                    ("bf16 CUDA graph", bf16, x16, True)]
        if compiled is not None:
            variants += [("bf16 torch.compile", compiled, x16, False),
                         ("bf16 torch.compile CUDA graph", compiled, x16, True)]
        for label, model in quantized.items():
            variants += [(f"{label} eager", model, x16, False), (f"{label} CUDA graph", model, x16, True)]
        for name, model, x, use_graph in variants:
            with torch.no_grad():
                run = tcaq_kernels.cuda_graphed(model) if use_graph else model
                fn = lambda m=run, x=x: m(x, t)
                ms = median_ms(fn)
            rows.append({"variant": name, "batch": batch, "ms_per_step": round(ms, 4),
                         "weight_bytes": model_bytes(model), "card": card})
            print(f"batch {batch:4d}  {name:34s} {ms:8.3f} ms/step", flush=True)
    for base_name, key in (("bf16 eager", "speedup_vs_bf16_eager"), ("bf16 CUDA graph", "speedup_vs_bf16_graph")):
        base = {r["batch"]: r["ms_per_step"] for r in rows if r["variant"] == base_name}
        for r in rows:
            r[key] = round(base[r["batch"]] / r["ms_per_step"], 3)
    tuning = os.environ.get("TCAQ_TRITON_TUNING", "")
    meta = {"command": (f"TCAQ_TRITON_TUNING={tuning} " if tuning else "") + "python " + " ".join(sys.argv),
            "card": card, "torch": torch.__version__,
            "triton": __import__("triton").__version__, "python": platform.python_version(),
            "model": str(args.model or "embedded ddpm-cifar10-small"),
            "fused_norms": {label: m.tcaq_info.get("fused_norms", 0) for label, m in quantized.items()},
            "fused_upsamplers": {label: m.tcaq_info.get("fused_upsamplers", 0) for label, m in quantized.items()},
            "split_skip": args.split_skip,
            "tuning": tuning or "full"}
    out = Path(args.out)
    atomic_write_json(out / "latency.json", {"meta": meta, "rows": rows})
    lines = [f"# End-to-end UNet latency ({meta['model']})", "",
             f"card: {card}; torch {meta['torch']}; triton {meta['triton']}; command: `{meta['command']}`", "",
             "| batch | variant | ms / step | × bf16 eager | × bf16 CUDA graph | weights + buffers (MB) |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['batch']} | {r['variant']} | {r['ms_per_step']:.3f} | {r['speedup_vs_bf16_eager']:.2f} | "
              f"{r['speedup_vs_bf16_graph']:.2f} | {r['weight_bytes'] / 1e6:.2f} |" for r in rows]
    atomic_write_text(out / "latency.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
