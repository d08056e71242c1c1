"""Calibrate a diffusers DDPM with min-max, convert it to integer layers, and sample in the pipeline.

    python python/calibrate_and_sample.py --bits W8A8 --out samples.png            # embedded model
    python python/calibrate_and_sample.py --model google/ddpm-cifar10-32 ...        # any DDIMPipeline

The converted UNet is a drop-in: the stock `DDIMPipeline` runs it unchanged.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from diffusers import DDIMPipeline
from PIL import Image

import tcaq_kernels
from tcaq_kernels.eval.grid import make_grid
from tcaq_kernels.models import default_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(default_model_dir()))
    parser.add_argument("--bits", default="W8A8")
    parser.add_argument("--backend", default="reference")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--out", default="samples.png")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = DDIMPipeline.from_pretrained(args.model).to(device)
    state = tcaq_kernels.calibrate(pipe, bits=args.bits, num_samples=16, num_steps=args.steps, timestep_groups=4)
    pipe.unet = tcaq_kernels.convert(pipe.unet, state, backend=args.backend)
    images = pipe(batch_size=args.n, num_inference_steps=args.steps, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    grid = make_grid((images * 255).round().astype(np.uint8), nrow=int(np.ceil(np.sqrt(args.n))))
    Image.fromarray(grid).save(args.out)
    print(f"{args.n} {args.bits} samples ({args.backend} backend) → {args.out}")


if __name__ == "__main__":
    main()
