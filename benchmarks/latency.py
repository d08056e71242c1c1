"""End-to-end UNet latency and weight memory: full precision and quantized, side by side, one run.

    python benchmarks/latency.py --batch 64 256 --out benchmarks/results
    python benchmarks/latency.py --arch sd15 --batch 2 8 --out DIR

on a CUDA machine (diffusers installed). `--arch sd15` times Stable Diffusion 1.5's UNet instead of the embedded
model: its architecture (`SD15_UNET`, 859.5 M parameters, 64×64 latents = 512 px images, 77 text tokens of 768)
with random weights — no weights of it are at hand, and a step's time depends on shapes and layouts, not on the
values; its quantized states come from min-max ranges observed over one forward per timestep group on random
latents and text (`observed_states`: a conditional UNet has no unconditional sampler to calibrate from).
Every row of one invocation is measured on the same card
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
`--ablate` adds, per bit width, the fused model with one transformer fusion undone at a time (`unfuse`:
the GEGLU feed-forward, the Transformer2DModel projections, the BasicTransformerBlock forward — residual adds
and LayerNorm + quantize —, its LayerNorm + quantize alone), so each
fusion's share of the step is measured in the same process.
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
from tcaq_kernels.calib.minmax import state_from_ranges  # noqa: E402
from tcaq_kernels.calib.observe import RangeObserver  # noqa: E402
from tcaq_kernels.calib.settings import uniform_group_edges  # noqa: E402
from tcaq_kernels.eval.loading import load_fp_unet, load_scheduler_config  # noqa: E402
from tcaq_kernels.quant.layers import DEFAULT_FLOAT_LAYERS, quantizable_layers  # noqa: E402
from tcaq_kernels.sampling import make_scheduler  # noqa: E402

# Stable Diffusion 1.5's UNet (the unet/config.json of its diffusers release; diffusers' defaults for the rest).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD15_TEXT_TOKENS = 77


def _ablations() -> dict:
    """--ablate's fusions: name → (the fused class convert swaps in, diffusers' class it came from), or for the
    LayerNorms (a switch of the fused blocks, not a class) None."""
    from diffusers.models.attention import BasicTransformerBlock, FeedForward
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from tcaq_kernels.nn.qfeedforward import FusedFeedForward
    from tcaq_kernels.nn.qtransformer import FusedBasicTransformerBlock, FusedTransformer2DModel

    return {"feed-forward": (FusedFeedForward, FeedForward),
            "transformer projections": (FusedTransformer2DModel, Transformer2DModel),
            "transformer blocks": (FusedBasicTransformerBlock, BasicTransformerBlock),
            "transformer layer norms": None}


def unfuse(model: torch.nn.Module, fusion: str) -> int:
    """Undo one of convert's fusions in `model` (in place: those modules get diffusers' class and code back — or,
    for the layer norms, the fused blocks run torch's LayerNorm again — the rest stays fused); returns how many
    modules changed. For A/B rows of one process."""
    from tcaq_kernels.nn.qtransformer import FusedBasicTransformerBlock

    classes = _ablations()[fusion]
    if classes is None:
        blocks = [m for m in model.modules() if type(m) is FusedBasicTransformerBlock and any(m.tcaq_ln)]
        for m in blocks:
            m.tcaq_ln = (False, False)
        return len(blocks)
    fused, plain = classes
    modules = [m for m in model.modules() if type(m) is fused]
    for m in modules:
        m.__class__ = plain
    return len(modules)


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


def float_layers(unet, float_attention: bool) -> list[str]:
    """The layers a speed state keeps float: calibrate's default (the first and last convs), and with
    `float_attention` every attention layer's scores, softmax and P·V (torch's SDPA on the bf16 q, k, v of its
    still-quantized projections)."""
    attention = [n for n, kind in quantizable_layers(unet).items() if kind == "attention"] if float_attention else []
    return [*DEFAULT_FLOAT_LAYERS, *attention]


def speed_states(fp32, scheduler, bits, split_skip: bool = False, float_attention: bool = False) -> dict:
    """{bits: min-max state} from a small budget, 4 timestep groups — the states the speed benchmarks
    (this file, step_profile.py) convert; `split_skip` gives the layout of the qdiffusion/tcaq presets."""
    return {b: tcaq_kernels.calibrate(fp32, scheduler=scheduler, bits=b, num_samples=32, num_steps=20,
                                      timestep_groups=4, batch_size=32, progress=False, split_skip=split_skip,
                                      keep_float=float_layers(fp32, float_attention))
            for b in bits}


def observed_states(unet, bits, text_tokens: int, batch: int = 2, timestep_groups: int = 4, seed: int = 0,
                    float_attention: bool = False) -> dict:
    """{bits: min-max state} of a conditional `unet` from the ranges one forward per timestep group (at the group's
    middle timestep) sees on random latents and text embeddings (`text_tokens` of the UNet's cross-attention
    width) — the states the SD-1.5 speed rows convert."""
    device = next(unet.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    edges = uniform_group_edges(1000, timestep_groups)
    keep = float_layers(unet, float_attention)
    layers = {n: k for n, k in quantizable_layers(unet).items() if n not in keep}
    observer = RangeObserver(unet, layers, edges)
    size, width = unet.config.sample_size, unet.config.cross_attention_dim
    with observer, torch.no_grad():
        for lo, hi in zip([0.0, *edges], [*edges, 1000.0]):
            x = torch.randn(batch, unet.config.in_channels, size, size, device=device, generator=g)
            text = torch.randn(batch, text_tokens, width, device=device, generator=g)
            unet(x, torch.tensor((lo + hi) // 2, device=device), encoder_hidden_states=text)
    settings = {"seed": seed, "act_qparams": "minmax", "calibration": "ranges of random latents and text"}
    return {b: state_from_ranges(unet, observer, b, keep, settings) for b in bits}


def speed_setup(arch: str, model_dir, bits, split_skip: bool = False, float_attention: bool = False):
    """(fp32 UNet on the GPU, {label: min-max state}, description) of `--arch` / `--model`: labels are the bits,
    and with `float_attention` also "<bits> float-attention" (states whose attention layers stay float)."""
    if arch == "sd15":
        if model_dir or split_skip:
            raise ValueError("--arch sd15 builds its UNet and observes its ranges: no --model, no --split-skip")
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        fp32 = UNet2DConditionModel(**SD15_UNET).eval().to("cuda")
        make = lambda float_attn: observed_states(fp32, bits, SD15_TEXT_TOKENS, float_attention=float_attn)
        description = "SD-1.5 UNet architecture, random weights, 77 text tokens"
    else:
        fp32 = load_fp_unet(model_dir, device="cuda")
        scheduler = make_scheduler(load_scheduler_config(model_dir))
        make = lambda float_attn: speed_states(fp32, scheduler, bits, split_skip, float_attn)
        description = str(model_dir or "embedded ddpm-cifar10-small")
    states = make(False)
    if float_attention:
        states.update({f"{b} float-attention": state for b, state in make(True).items()})
    return fp32, states, description


def step_inputs(unet, batch: int, seed: int = 0, device="cuda") -> dict:
    """{dtype: (latents x, forward keyword arguments)} for fp32 and bf16: random latents [B, C, S, S] and, for a
    conditional UNet, random text embeddings of `SD15_TEXT_TOKENS` tokens — the same values in both dtypes."""
    g = torch.Generator(device=device).manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, size, size, device=device, generator=g)
    width = getattr(unet.config, "cross_attention_dim", None)
    text = None if width is None else torch.randn(batch, SD15_TEXT_TOKENS, width, device=device, generator=g)
    return {dtype: (x.to(dtype), {} if text is None else {"encoder_hidden_states": text.to(dtype)})
            for dtype in (torch.float32, torch.bfloat16)}


def command_line() -> str:
    """This process's command as a shell line, every TCAQ_* switch that was set in front (the figures depend on them)."""
    switches = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("TCAQ_"))
    return (switches + " " if switches else "") + "python " + " ".join(sys.argv)


def model_bytes(model) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("embedded", "sd15"), default="embedded",
                        help="the embedded DDPM-CIFAR10 model (or --model), or SD-1.5's UNet with random weights")
    parser.add_argument("--model", default=None, help="a UNet2DModel folder in place of the embedded model")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--bits", nargs="+", default=["W8A8", "W4A8"])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--fuse-norm", choices=("both", "on", "off"), default="both",
                        help="convert(fuse_norm=…) of the quantized rows: GroupNorm+SiLU+quantize as one kernel "
                             "(convert's default), the unfused path ('fuse_norm=False' rows), or both (default)")
    parser.add_argument("--split-skip", action="store_true",
                        help="states with split skip inputs, the layout of the qdiffusion/tcaq presets (default: off)")
    parser.add_argument("--float-attention", action="store_true",
                        help="also rows with every attention layer's scores, softmax and P·V left to torch's SDPA "
                             "(the projections stay quantized)")
    parser.add_argument("--ablate", action="store_true",
                        help="also rows of the fused models with one transformer fusion undone at a time "
                             "(feed-forward GEGLU, transformer projections, transformer blocks' residual "
                             "adds and LayerNorms, their LayerNorms alone)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("latency.py measures GPU latency: no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    card = torch.cuda.get_device_name()
    try:
        fp32, states, description = speed_setup(args.arch, args.model, args.bits, args.split_skip,
                                                args.float_attention)
    except ValueError as e:
        parser.error(str(e))
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    fuse_options = {"both": (True, False), "on": (True,), "off": (False,)}[args.fuse_norm]
    quantized = {f"{b} triton" + ("" if fuse else " fuse_norm=False"):
                 tcaq_kernels.convert(bf16, s, backend="triton", fuse_norm=fuse)
                 for b, s in states.items() for fuse in fuse_options}
    if args.ablate:
        for b, s in states.items():
            for fusion in _ablations():
                model = tcaq_kernels.convert(bf16, s, backend="triton")
                if unfuse(model, fusion):
                    quantized[f"{b} triton without fused {fusion}"] = model
    compiled = None if args.no_compile else torch.compile(copy.deepcopy(bf16))
    rows = []
    for batch in args.batch:
        inputs = step_inputs(fp32, batch)
        (x32, _), (x16, _) = inputs[torch.float32], inputs[torch.bfloat16]
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
                fn = lambda m=run, x=x: m(x, t, **inputs[x.dtype][1])
                ms = median_ms(fn)
            rows.append({"variant": name, "batch": batch, "ms_per_step": round(ms, 4),
                         "weight_bytes": model_bytes(model), "card": card})
            print(f"batch {batch:4d}  {name:34s} {ms:8.3f} ms/step", flush=True)
    for base_name, key in (("bf16 eager", "speedup_vs_bf16_eager"), ("bf16 CUDA graph", "speedup_vs_bf16_graph")):
        base = {r["batch"]: r["ms_per_step"] for r in rows if r["variant"] == base_name}
        for r in rows:
            r[key] = round(base[r["batch"]] / r["ms_per_step"], 3)
    tuning = os.environ.get("TCAQ_TRITON_TUNING", "")
    meta = {"command": command_line(),
            "card": card, "torch": torch.__version__,
            "triton": __import__("triton").__version__, "python": platform.python_version(),
            "model": description,
            "fused_norms": {label: m.tcaq_info.get("fused_norms", 0) for label, m in quantized.items()},
            "fused_upsamplers": {label: m.tcaq_info.get("fused_upsamplers", 0) for label, m in quantized.items()},
            "split_skip": args.split_skip, "float_attention_rows": args.float_attention, "ablate": args.ablate,
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
