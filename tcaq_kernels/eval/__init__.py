"""Quality evaluation harness: FID-ResNet56, an IS-like score, same-seed fidelity, sample grids.

Everything that reports image quality in this project goes through here, so that numbers from
different branches (full precision, simulated quantization, real kernels) are comparable:

- `resnet56`   the CIFAR ResNet-56 feature network (pooled 64-d features and logits);
- `data`       the shared CIFAR-10 test set and the default locations of shared files;
- `fid`        Fréchet distance, FID-ResNet56 with cached reference statistics, the IS-like score,
               the test-set floor, and Inception FID where its weights happen to be on disk;
- `fidelity`   same-seed comparison of two UNets (per-step eps error, final-image PSNR/MSE);
- `generate`   resumable, sharded, data-parallel sampling with fixed per-sample seeds;
- `grid`       8×8 sample grids, side by side with full precision;
- `results`    the shared `benchmarks/results/quality.json` row writer;
- `cli`        the `evaluate` subcommand.

Submodules are imported on demand; importing this package pulls in nothing heavy.
"""
