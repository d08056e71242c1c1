"""Host time of an eager quantized UNet step with every kernel launch stubbed out: the layers' own Python.

Why: run eagerly, a converted UNet spends its step on the host (benchmarks/results/latency*.md), and the
`torch.library` custom ops the layers call add a dispatcher round trip to each of their ~110 calls a
step. This times forwards of the embedded model converted with `backend="triton"` (min-max W8A8, batch
1) in Triton's interpreter with the launches replaced by no-ops — so the float parts of the UNet run,
the kernels do not — once with the layers calling the custom ops and once calling their Python
functions directly (`triton_ops.call`, the default), alternating in one process. CPU only:

    python benchmarks/host_overhead.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import tcaq_kernels  # noqa: E402
from tcaq_kernels.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from tcaq_kernels.eval.loading import load_fp_unet, load_scheduler_config  # noqa: E402
from tcaq_kernels.ops import triton_ops  # noqa: E402
from tcaq_kernels.sampling import make_scheduler  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="forwards per round and mode (median taken)")
    args = p.parse_args()
    launches = [0]

    def stub(self, *a, **k):
        launches[0] += 1

    InterpretedFunction.run = stub
    torch.manual_seed(0)
    unet = load_fp_unet(None, device="cpu")
    state = tcaq_kernels.calibrate(unet, scheduler=make_scheduler(load_scheduler_config(None)), bits="W8A8",
                                   num_samples=4, num_steps=8, timestep_groups=4, batch_size=4, progress=False)
    model = tcaq_kernels.convert(unet, state, backend="triton")
    x, t = torch.randn(1, 3, 32, 32), torch.tensor(500)
    modes = {"custom op": lambda op, x, *a, **k: op(x, *a, **k), "direct (triton_ops.call)": triton_ops.call}
    ms = {m: [] for m in modes}
    direct = triton_ops.call
    try:
        with torch.no_grad():
            for _ in range(3):
                model(x, t)
            for _ in range(args.rounds):
                for mode, fn in modes.items():
                    triton_ops.call = fn
                    launches[0] = 0
                    times = []
                    for _ in range(args.steps):
                        t0 = time.perf_counter()
                        model(x, t)
                        times.append(time.perf_counter() - t0)
                    ms[mode].append(1e3 * statistics.median(times))
    finally:
        triton_ops.call = direct
    meta = {"command": "python " + " ".join(sys.argv), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch": torch.__version__, "launches_per_step": launches[0] // args.steps}
    atomic_write_json(args.out / "host_overhead.json", {"meta": meta, "ms_per_step": ms})
    lines = ["# Eager host time per UNet step, kernel launches stubbed", "",
             f"{meta['cores']} CPU cores, torch {meta['torch']}, {meta['launches_per_step']} stubbed launches a step; "
             f"`{meta['command']}`. Median ms per forward in each round (rounds alternate the two modes).", "",
             "| mode | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " | median |",
             "| --- |" + " ---: |" * (args.rounds + 1)]
    lines += [f"| {m} | " + " | ".join(f"{v:.1f}" for v in vs) + f" | **{statistics.median(vs):.1f}** |"
              for m, vs in ms.items()]
    atomic_write_text(args.out / "host_overhead.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
