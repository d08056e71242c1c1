"""Where a UNet step's GPU time goes: device time per kernel, bf16 (eager and `torch.compile`) beside the
converted W8A8 model (fused and unfused ResBlock norms), one process, one card.

Why: `latency.py` says how long a step takes from CUDA graphs (W8A8 at batch 256: 1.96× bf16 from a graph,
1.02× bf16 `torch.compile` from graphs on an H200); this says which kernels make up each model's step, so the gap
to compiled bf16 can be attributed. Each model runs `--steps` eager forwards under `torch.profiler`
(CUDA activity only); a kernel's time is its own device time, so the host gaps of eager execution do
not count and the per-step sum is the GPU-busy time a graph replay cannot go below. Kernels are put
in categories by name (`CATEGORIES`, first match wins). Run on a GPU machine (diffusers installed):

    TCAQ_TRITON_TUNING=quick python benchmarks/step_profile.py --batch 64 --out benchmarks/results

Writes step_profile.json ({"meta", "rows"}: one row per model × kernel: calls and µs per step, its
category) and step_profile.md (µs per step by category for every model, then each model's top kernels).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tcaq_kernels  # noqa: E402
from tcaq_kernels.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from latency import command_line, speed_setup, step_inputs  # noqa: E402  (benchmarks/ is this script's directory)

# (category, regex on the kernel name); our Triton kernels first, then the libraries', then the rest
CATEGORIES = [
    ("triton conv", r"_qconv|conv_wgmma|_conv_kernel"), ("triton gemm", r"_qgemm|gemm_wgmma|_w8a8_wgmma"),
    ("triton groupnorm", r"_gn_"), ("triton attention", r"_qattn|_quantize_qkv"),
    ("triton quantize", r"_quantize_kernel|quantize_act"), ("split-K reduce", r"split_?k|_reduce"),
    ("inductor fused", r"^triton_"), ("attention (sdpa)", r"flash|fmha|attention|softmax"),
    ("groupnorm (torch)", r"group_?norm|GroupNorm|RowwiseMoments"), ("upsample (torch)", r"upsample|nearest"),
    ("cutlass gemm (csrc)", r"tcaq::"), ("conv (cudnn)", r"conv|cudnn|implicit|fprop|nchw|nhwc"),
    ("gemm (cublas)", r"gemm|cutlass|sm90_xmma|matmul|cublas|nvjet"),
    ("copies", r"copy|transpose|permute|contiguous|cat"), ("elementwise (torch)", r"elementwise|vectorized|reduce"),
]


def category(kernel: str) -> str:
    for name, pattern in CATEGORIES:
        if re.search(pattern, kernel, re.IGNORECASE):
            return name
    return "other"


def kernel_times(events, steps: int) -> dict[str, tuple[float, float]]:
    """{kernel name: (calls per step, µs per step)} from a profiler's device-side events."""
    acc = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            acc[e.name][0] += 1
            acc[e.name][1] += e.time_range.elapsed_us()
    return {k: (n / steps, us / steps) for k, (n, us) in acc.items()}


def profile_model(model, x, t, steps: int, **kwargs) -> dict[str, tuple[float, float]]:
    with torch.no_grad():
        for _ in range(3):
            model(x, t, **kwargs)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                model(x, t, **kwargs)
            torch.cuda.synchronize()
    return kernel_times(prof.events(), steps)


def render(meta: dict, rows: list[dict], top: int = 12) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    cats = [c for c, _ in CATEGORIES] + ["other"]
    by = defaultdict(float)
    for r in rows:
        by[r["model"], r["category"]] += r["us_per_step"]
    lines = [f"# GPU time of one UNet step by kernel ({meta['model']}, batch {meta['batch']})", "",
             f"card: {meta['card']}; torch {meta['torch']}; triton {meta['triton']}; command: `{meta['command']}`", "",
             "µs of device time per step (eager forwards under torch.profiler, kernels' own time):", "",
             "| category | " + " | ".join(models) + " |", "| --- |" + " ---: |" * len(models)]
    for c in cats:
        if any(by[m, c] for m in models):
            lines.append(f"| {c} | " + " | ".join(f"{by[m, c]:.0f}" for m in models) + " |")
    totals = {m: sum(r["us_per_step"] for r in rows if r["model"] == m) for m in models}
    calls = {m: sum(r["calls_per_step"] for r in rows if r["model"] == m) for m in models}
    lines.append("| **total** | " + " | ".join(f"**{totals[m]:.0f}**" for m in models) + " |")
    lines.append("| kernels per step | " + " | ".join(f"{calls[m]:.0f}" for m in models) + " |")
    for m in models:
        mine = sorted((r for r in rows if r["model"] == m), key=lambda r: -r["us_per_step"])[:top]
        lines += ["", f"## {m}: top {len(mine)} kernels", "", "| kernel | category | calls / step | µs / step |",
                  "| --- | --- | ---: | ---: |"]
        lines += [f"| `{r['kernel'][:90]}` | {r['category']} | {r['calls_per_step']:.1f} | {r['us_per_step']:.1f} |"
                  for r in mine]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=("embedded", "sd15"), default="embedded", help="latency.py's --arch")
    p.add_argument("--model", default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--bits", default="W8A8")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--split-skip", action="store_true", help="latency.py's --split-skip: the tcaq/qdiffusion layout")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("step_profile.py profiles GPU kernels: no CUDA device")
    card = torch.cuda.get_device_name()
    try:
        fp32, states, description = speed_setup(args.arch, args.model, [args.bits], args.split_skip)
    except ValueError as e:
        p.error(str(e))
    state = states[args.bits]
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    models = {"bf16": bf16, "bf16 torch.compile": torch.compile(copy.deepcopy(bf16)),
              f"{args.bits} triton": tcaq_kernels.convert(bf16, state, backend="triton"),
              f"{args.bits} triton fuse_norm=False": tcaq_kernels.convert(bf16, state, backend="triton",
                                                                          fuse_norm=False)}
    x, kwargs = step_inputs(fp32, args.batch)[torch.bfloat16]
    t = torch.tensor(500, device="cuda")
    rows = []
    for name, model in models.items():
        times = profile_model(model, x, t, args.steps, **kwargs)
        rows += [{"model": name, "kernel": k, "category": category(k), "calls_per_step": round(n, 3),
                  "us_per_step": round(us, 3)} for k, (n, us) in times.items()]
        print(f"{name:36s} {sum(us for _, us in times.values()):9.1f} µs/step in "
              f"{sum(n for n, _ in times.values()):.0f} kernels", flush=True)
    tuning = os.environ.get("TCAQ_TRITON_TUNING", "")
    meta = {"command": command_line(),
            "card": card, "torch": torch.__version__, "triton": __import__("triton").__version__,
            "python": platform.python_version(), "model": description,
            "batch": args.batch, "steps": args.steps, "tuning": tuning or "full", "split_skip": args.split_skip}
    atomic_write_json(args.out / "step_profile.json", {"meta": meta, "rows": rows})
    atomic_write_text(args.out / "step_profile.md", render(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
