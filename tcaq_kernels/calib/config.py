"""Every option of the reconstruction-based methods, with its default and why.

The presets (`presets.py`) are named sets of overrides of `MethodConfig`; anything METHOD.md marks
[ours] is an option here, so a reader can see what was decided and change it per call:
`calibrate(pipe, bits, method="tcaq", iters=500, tcr_clamp=None)`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Mapping, Optional, Sequence

from ..quant.layers import DEFAULT_FLOAT_LAYERS

WEIGHT_SCALE_RULES = ("minmax", "mse")
ACT_INIT_RULES = ("minmax", "mse")
BLOCK_INPUTS = ("quantized", "float")
TCR_GRANULARITIES = ("step", "group")
DAQ_ALTERNATIVES = ("exponential", "lognormal")
DAQ_RULES = ("llr", "llr+mse", "mse", "uniform", "log2")


@dataclass(frozen=True)
class MethodConfig:
    """Options of `pipeline.calibrate_with_config`; the field comments are the documentation."""

    # --- calibration data (data.py) -----------------------------------------------------------
    num_samples: int = 64  # DDIM trajectories of the full-precision sampler (one seed each)
    num_steps: int = 100  # DDIM steps per trajectory (eta 0, as in the evaluation protocol)
    seed: int = 0  # first trajectory seed; trajectory i uses seed + i
    batch_size: int = 64  # batch of sampling and of the capture passes
    # (step, trajectory) points used for initialisation and reconstruction, spread evenly over the
    # sampler's steps (Q-Diffusion's "uniform over timesteps"); None uses every point.
    num_points: Optional[int] = 2048
    # --- quantizer layout ---------------------------------------------------------------------
    timestep_groups: int = 1  # activation parameter sets over [0, T), equal timestep ranges
    # True: every activation quantizer has its own parameters per timestep group. False: one set
    # shared by all groups (only DAQ's post-softmax quantizer still varies per group).
    group_act_params: bool = True
    keep_float: Sequence[str] = DEFAULT_FLOAT_LAYERS  # layers left in float
    # Activation bits per layer-name pattern (fnmatch), overriding the A of `bits` — e.g.
    # {"*.conv_shortcut": 8} at W4A4, where those 13 layers carry about half of the error
    # (calib/README.md). Empty: one width everywhere, as the paper's tables.
    act_bits: Mapping[str, int] = field(default_factory=dict)
    # Q-Diffusion's shortcut splitting: an up-block ResBlock's conv1 and conv_shortcut read
    # cat([h, skip]), two ranges of very different size; True gives the skip channels a quantizer of
    # their own ("input_skip", CalibState v2). On by default, as in Q-Diffusion, whose baseline
    # every reconstruction preset builds on; the `minmax` preset turns it off (presets.py).
    split_skip: bool = True
    # --- initialisation (initialize.py) -------------------------------------------------------
    weight_scale: str = "mse"  # per-channel weight scale: full range, or MSE-optimal clipping
    act_init: str = "mse"  # activation qparams: observed range, or MSE-optimal clipping
    init_points: Optional[int] = 512  # points whose activations initialise quantizers (None: all)
    init_values: int = 1 << 16  # activation values kept per quantizer and group for the MSE searches
    # --- TCR (tcr.py) ---------------------------------------------------------------------------
    tcr: bool = False
    tcr_clamp: Optional[float] = 10.0  # upper bound on r (None: unbounded); bounds the weight range growth
    tcr_granularity: str = "step"  # "step": one m[t, c] per sampler step (the paper's reading); "group": per timestep group
    tcr_linear: bool = False  # also reparameterise Linear inputs (the paper covers convs)
    # Migration strengths a tried per layer, r ← r^a: the one with the smallest layer-output error
    # (weights and inputs quantized) wins. (1.0,) is the paper's full equalisation; a = 0 is "no TCR",
    # so the search never makes a layer worse than without TCR on its search inputs. Full
    # equalisation multiplies weight columns by up to the clamp, which 4-bit weights pay for.
    tcr_strengths: Sequence[float] = (1.0,)
    tcr_search_points: int = 32  # inputs per layer kept for the strength search
    # --- DAQ (daq.py) ---------------------------------------------------------------------------
    daq: bool = False
    daq_alternative: str = "exponential"  # distribution the power law is compared against
    daq_pvalue: Optional[float] = None  # also require the Vuong p-value below this (None: sign of R only)
    daq_xmin_quantiles: int = 20  # candidate x_min values (quantiles of the sample) for the KS choice
    daq_values: int = 20000  # post-softmax values per layer and group used by the fit
    # How DAQ picks the quantizer of a (layer, group). "llr": the paper's test alone (log2 when the power
    # law wins, R > 0). "llr+mse" [ours]: log2 only when the test says so AND the log2 quantizer's MSE on
    # the sampled values is below the uniform one's. "mse": the smaller MSE, ignoring the test. Why not
    # the test alone: log2 rounds to the nearest power of √2 (±41 % per value whatever the bit width),
    # and on the reference model's attention maps 8-bit uniform P gave 10–50× smaller P·V error than log2
    # in every layer and timestep we measured, while the test chose log2 for ~92 % of (layer, group)
    # pairs of the tcaq W8A8 state (calib/README.md, "DAQ rule"). "uniform" / "log2": every (layer, group)
    # gets that kind — ablation controls that keep DAQ's per-group post-softmax sets and change only the choice.
    daq_rule: str = "llr+mse"
    # [ours] Divide each row of the quantized post-softmax map by its own quantized mass (CalibState v3
    # `p_row_norm`; quant/primitives.py `attention_row_scale`), for every attention layer and kind. A
    # coarse quantizer drops much of a long row's mass (small probabilities round to 0), every attention
    # output shrinks with it and the samples fade; normalising restores a convex combination of V and
    # makes s_p cancel. Free in the fused kernel (Σ p̂ accumulates beside P·V). On the CPU with only the
    # maps quantized (benchmarks/results/attention_row_mass.md, 16 samples): log2 41.9 → 50.7 dB PSNR,
    # 6-bit uniform 24.2 → 30.4 dB and no fade. The quantizer searches (initialisation, DAQ's MSE
    # comparison) still measure the unnormalised map's error. Off: in whole GPU calibrations (2k, H200, 27 Nov)
    # it moved FID-ResNet56 by −11 … +6 % in paired deterministic runs (tcaq W4A8 4.35 → 3.85, W4A4 11.02 →
    # 11.65), within the spread elsewhere, and did not stop qdiffusion+daq's W4A4 fade (calib/README.md).
    p_row_norm: bool = False
    # [ours] Quantize e = exp(S − row max) ∈ (0, 1] instead of the softmax and divide P·V by the float row
    # sum Σ e afterwards (CalibState v4 `p_row_max`; quant/primitives.py `row_max_exp`), for every attention
    # layer; with `p_row_norm` as well the quantized mass divides instead. Float: exactly softmax·V. Why: the
    # fused kernel then needs one exponential per score instead of two (the softmax's codes need the row's
    # final sum first). Every p quantizer (DAQ's choice, its searches, the learned step) sees e, each row's
    # largest entry exactly 1. Off until its quality is measured (calib/README.md).
    p_row_max: bool = False
    # --- block reconstruction (reconstruct.py) --------------------------------------------------
    reconstruct: bool = True
    # optimisation steps per block in the first round (BRECQ/Q-Diffusion use 20k). 3000 (28 Nov, 10k, H100,
    # ~400 s for tcaq) made W4A8 +4.9 dB PSNR more faithful (30.1 vs 25.0–25.4) and W4A4 +2.2 dB, W8A8 no
    # change — but W4A8's FID-ResNet56 went 3.42/3.75 → 3.79/4.02 (two calibrations: less grain), so 1000
    # stays the default and the quality table's commands stay comparable; calib/README.md "Reconstruction steps"
    iters: int = 1000
    recon_batch_size: int = 32
    # "quantized": a block sees the inputs the partly quantized model gives it (BRECQ's choice);
    # "float": the full-precision model's inputs. Targets are always full-precision outputs.
    block_inputs: str = "quantized"
    weight_lr: float = 1e-3  # Adam on the AdaRound variables
    act_lr: float = 1e-3  # Adam on log(step size): a relative change per step, the same for every layer
    learn_act_scale: bool = True  # LSQ: learn activation step sizes jointly with the rounding
    # Also learn the scale of DAQ's log2 post-softmax sets (codes held fixed: a gain on the map). Off:
    # they keep the MSE-searched scale while uniform P sets learn theirs, and the 27 Nov (ninth session)
    # ablations found DAQ alone hurting at 6 and 4 activation bits (W6A6 FID 6.07 against qdiffusion's
    # 5.17, faded samples) although its per-map choice lowers the P·V error (daq_output_error.md): the
    # learned uniform step is a correction the log2 maps never get. Measured (ninth session, W6A6 2k, one
    # calibration each): qdiffusion+daq 6.07 → 6.19 with it, fine-energy ratio 0.745 → 0.713: no gain,
    # so it stays off; the option remains for the next hypothesis about DAQ's fade.
    learn_log2_scale: bool = False
    round_weight: float = 0.01  # weight of AdaRound's rounding regulariser
    beta_start: float = 20.0  # AdaRound regulariser temperature, annealed linearly …
    beta_end: float = 2.0  # … to this
    warmup: float = 0.2  # share of the iterations before the regulariser starts
    # --- PAR (par.py) ---------------------------------------------------------------------------
    par_rounds: int = 0  # rounds of regenerate-from-quantized-model + reconstruct again
    par_iters_decay: float = 0.5  # round k runs iters · decay^k optimisation steps
    par_fresh_seeds: bool = False  # False: regenerate from the same seeds (same noise, the quantized trajectory)
    # Share of each PAR round's points taken from the full-precision trajectories of round 0 instead of
    # the regenerated ones. 0 is PAR as described (every point from the quantized model's own sampling).
    # At W4A4 PAR fades the samples (`qdiffusion+par` turned every sample grey); on the CPU, 0.5 and 1
    # softened the fade but did not end it — the extra rounds fade even without regenerated data
    # (calib/README.md, "Which part of PAR fades").
    par_float_share: float = 0.0
    # False: PAR rounds keep round 0's weight rounding and learn only the activation step sizes. On the
    # CPU middle budget that faded W4A4 far less (fine energy 0.84× vs 0.15× with the rounding learned
    # again); on the GPU (27 Nov) it did not hold: W4A4's round still faded, W4A8 lost PAR's gain (3.93 vs
    # 3.42/3.75; calib/README.md, "The guard on the GPU")
    par_learn_rounding: bool = True
    # [ours] PAR guard (guard.py): before and after each PAR round the quantized model samples this many
    # held-out seeds; a round that raises the fade (−log fine-energy ratio against the full-precision
    # samples, floored at 0) by more than `par_guard_fade_tol` — or, when `par_guard_psnr_tol_db` is set,
    # lowers their PSNR by more than that — is undone and PAR stops. 0 samples: no guard (PAR as
    # described). At W4A4 PAR fades the samples while at W4A8 it helps (calib/README.md, "PAR guard").
    # PSNR is recorded but not decisive by default: at W4A8 PAR lowered it (27.03 vs 27.86 dB, 10k) and
    # still improved FID-ResNet56 (3.71 vs 4.30); with both at tolerance 0 (439da3c) the guard undid
    # round 1 at every bit width on the GPU, small changes of either statistic deciding.
    par_guard_samples: int = 0
    par_guard_fade_tol: float = 0.1
    par_guard_psnr_tol_db: Optional[float] = None
    # --- execution ------------------------------------------------------------------------------
    device: Optional[str] = None  # None: the UNet's device
    # replay each block's reconstruction step as a CUDA graph (on CUDA devices): the same computation
    # as the eager step, one launch instead of hundreds (the step is launch-bound for small blocks)
    cuda_graphs: bool = True
    # where a round's full-precision block outputs wait for their block (P × 3.6 MB for the
    # reference model); None: the compute device. "cpu" trades GPU memory for a copy per block.
    cache_device: Optional[str] = None
    # torch's deterministic kernels only (determinism.py): two GPU calibrations of one seed give the same
    # state. Off by default: GPU calibrations of one seed differ (W4A4 FID 12.1 vs 16.5, 27 Nov) but the
    # cost and coverage of the deterministic kernels on the GPU are not measured yet.
    deterministic: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        _choice("weight_scale", self.weight_scale, WEIGHT_SCALE_RULES)
        _choice("act_init", self.act_init, ACT_INIT_RULES)
        _choice("block_inputs", self.block_inputs, BLOCK_INPUTS)
        _choice("tcr_granularity", self.tcr_granularity, TCR_GRANULARITIES)
        _choice("daq_alternative", self.daq_alternative, DAQ_ALTERNATIVES)
        _choice("daq_rule", self.daq_rule, DAQ_RULES)
        for name in ("num_samples", "num_steps", "batch_size", "recon_batch_size", "timestep_groups", "init_values",
                     "daq_values", "tcr_search_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")
        for name in ("num_points", "init_points"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value}: must be at least 1, or None for every point")
        if self.iters < 0 or self.par_rounds < 0:
            raise ValueError(f"iters={self.iters}, par_rounds={self.par_rounds}: must not be negative")
        if self.tcr_clamp is not None and self.tcr_clamp < 1:
            raise ValueError(f"tcr_clamp={self.tcr_clamp}: r ≥ 1 by construction, so a clamp below 1 is meaningless")
        if not self.tcr_strengths or any(not 0 <= a <= 1 for a in self.tcr_strengths):
            raise ValueError(f"tcr_strengths={self.tcr_strengths}: need at least one strength, each in [0, 1]")
        if self.daq_pvalue is not None and not 0 < self.daq_pvalue <= 1:
            raise ValueError(f"daq_pvalue={self.daq_pvalue}: must be in (0, 1]")
        if not 0 <= self.par_float_share <= 1:
            raise ValueError(f"par_float_share={self.par_float_share}: must be in [0, 1]")
        if not 0 < self.par_iters_decay <= 1:
            raise ValueError(f"par_iters_decay={self.par_iters_decay}: must be in (0, 1]")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup={self.warmup}: must be in [0, 1)")
        if self.par_guard_samples < 0 or (self.par_guard_psnr_tol_db or 0) < 0 or self.par_guard_fade_tol < 0:
            raise ValueError(f"par_guard_samples={self.par_guard_samples}, par_guard_psnr_tol_db="
                             f"{self.par_guard_psnr_tol_db}, par_guard_fade_tol={self.par_guard_fade_tol}: "
                             "must not be negative")
        if self.par_rounds and not self.reconstruct:
            raise ValueError("par_rounds > 0 needs reconstruct=True: PAR repeats the reconstruction")

    def updated(self, **options) -> "MethodConfig":
        """A copy with `options` changed; unknown names are refused with the list of known ones."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown calibration option(s) {unknown}; known options: {sorted(known)}")
        for name in ("keep_float", "tcr_strengths"):
            if name in options:
                options[name] = tuple(options[name])
        return replace(self, **options)

    def as_settings(self) -> dict:
        """JSON-able record of the configuration, stored in the CalibState's settings."""
        out = asdict(self)
        out["keep_float"] = list(self.keep_float)
        out["tcr_strengths"] = list(self.tcr_strengths)
        out.pop("progress")
        return out


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {allowed}")
