"""One calibration job from the command line: its flags (declared once), checks and defaults.

``toptheta calibrate`` and ``python -m topθ_core.distributed`` (torchrun) take the same flags,
built by :func:`add_calibration_arguments`.  :func:`job_from_args` turns parsed arguments into
a frozen :class:`CalibrationJob`, validating the configs before any model is loaded, so a bad
combination fails in a second, not after an hour.  How the job then runs (one process,
``--workers`` local ranks, or ranks under torchrun) is decided after parsing.

Defaults are the paper's and the app's: TAC on, σ 0.1, layers 0-1 at k = 512, VMC on TAC rows,
exact SDC as the intended inference setting.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from .config import (SDC, Aggregation, CalibrationConfig, ConfigError, KSchedule, Placement, SdcSource, Selection,
                     SparseConfig, ThetaReference)

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULTS = CalibrationConfig()


def add_calibration_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Declare every calibration flag on ``p`` (both command lines use this one builder)."""
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a local transformers checkpoint directory")
    p.add_argument("--data", required=True, help=".txt/.jsonl/.csv/.parquet file (same path on every node), "
                                                 "or bundled:NAME")
    p.add_argument("--limit", type=int, default=None, help="use the first N documents")
    p.add_argument("--max-length", type=int, default=None, help="truncate documents to this many tokens")
    p.add_argument("--no-special-tokens", action="store_true", help="tokenize without BOS/special tokens")
    p.add_argument("--out", required=True, help="artifact directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing artifact")
    s = p.add_argument_group("what is calibrated (defaults: the paper's settings, as in the app)")
    s.add_argument("--k", type=int, default=DEFAULTS.k.default, help="kept elements per row (default %(default)s)")
    s.add_argument("--layer-k", default=DEFAULTS.k.to_text(),
                   help="per-layer overrides LAYER:K (default %(default)s: layers 0-1 near-dense, as in the paper)")
    s.add_argument("--head-k", default=None, help="per-(layer, head) overrides LAYER.HEAD:K, e.g. 2.0:48,2.1:80")
    s.add_argument("--allocate-head-k", type=float, default=None, metavar="MASS",
                   help="give each head of the layers at --k a k proportional to the mean number of elements its "
                        "rows need to reach MASS (e.g. 0.9) of their softmax mass on the calibration data (layer "
                        "mean k unchanged); one extra dense pass; one process only")
    s.add_argument("--theta-reference", choices=[e.value for e in ThetaReference], default=DEFAULTS.theta_reference.value,
                   help="absolute: keep a > θ; row-max: keep a − rowmax > θ_rel (pre-softmax)")
    s.add_argument("--placement", choices=[e.value for e in Placement], default=DEFAULTS.placement.value)
    s.add_argument("--sigma", type=float, default=DEFAULTS.sigma,
                   help="θ = location + σ·scale of the --aggregation (default %(default)s)")
    s.add_argument("--aggregation", choices=[e.value for e in Aggregation], default=DEFAULTS.aggregation.value,
                   help="mean-std: θ = mean + σ·std; median: median + σ·1.4826·MAD; trimmed-mean: mean + σ·std "
                        "of the samples left after cutting --trim-fraction off each end")
    s.add_argument("--reservoir-capacity", type=int, default=DEFAULTS.reservoir_capacity,
                   help="threshold samples kept per (layer, head, length bin) for median / trimmed-mean "
                        "(exact up to this many)")
    s.add_argument("--trim-fraction", type=float, default=DEFAULTS.trim_fraction,
                   help="share of samples cut off each end for trimmed-mean, in [0, 0.5)")
    s.add_argument("--tac", action=argparse.BooleanOptionalAction, default=DEFAULTS.tac,
                   help="top-k at calibration: each thresholded row is replaced by its exact top-k so later layers "
                        "see sparse activations (default on, as in the paper)")
    s.add_argument("--vmc", action=argparse.BooleanOptionalAction, default=DEFAULTS.vmc,
                   help="VMC on top-k-at-calibration rows (default on)")
    s.add_argument("--sdc", choices=[e.value for e in SDC], default=SDC.EXACT.value,
                   help="SDC the thresholds are meant for (validated and recorded; offline terms are always stored)")
    s.add_argument("--sdc-scale", type=float, default=1.0)
    s.add_argument("--capk", action="store_true", help="recorded as the intended inference setting")
    s.add_argument("--sdc-source", choices=[e.value for e in SdcSource], default=DEFAULTS.sdc_source.value,
                   help="offline SDC term from the top-k dropped set, or from a second pass under Top-θ "
                        "(one process only)")
    s.add_argument("--sample-frac", type=float, default=DEFAULTS.sample_frac,
                   help="fraction of rows sampled per call; several ranks equal one process only at 1.0")
    s.add_argument("--bin-width", type=int, default=DEFAULTS.bin_width, help="length-bin width in tokens")
    s.add_argument("--seed", type=int, default=DEFAULTS.seed)
    r = p.add_argument_group("where it runs")
    r.add_argument("--device", default=None, help="cpu, cuda (under torchrun: this rank's GPU) or cuda:N; default: "
                                                  "cpu in one process, this rank's GPU if any under torchrun")
    r.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights dtype; auto: float32 on CPU, bfloat16 on GPU")
    r.add_argument("--workers", type=int, default=1,
                   help="calibrate in N local processes (data parallel, no torchrun needed), each with 1/N of the "
                        "CPU threads; faster on a CPU than one process using every thread")
    r.add_argument("--distributed", action="store_true",
                   help="this process is one rank of a torchrun job (implied by python -m topθ_core.distributed)")
    r.add_argument("--device-map", choices=["auto"], default=None,
                   help="spread the model over --gpus-per-rank GPUs of each rank (accelerate); distributed only")
    r.add_argument("--gpus-per-rank", type=int, default=1)
    r.add_argument("--backend", choices=["nccl", "gloo"], default=None, help="default: nccl on GPU, gloo on CPU")
    r.add_argument("--timeout", type=float, default=1800.0, help="seconds a rank waits for the others")
    return p


@dataclass(frozen=True)
class CalibrationJob:
    """Everything a calibration run needs, checked; built by :func:`job_from_args`."""

    model: str
    data: str
    out: str
    config: CalibrationConfig
    intended: SparseConfig  # the inference variant the thresholds are meant for (recorded as intended_sdc)
    limit: int | None = None
    max_length: int | None = None
    add_special_tokens: bool = True
    overwrite: bool = False
    allocate_head_k: float | None = None
    device: str | None = None  # None: decided where the job runs (this rank's GPU under torchrun)
    dtype: str = "auto"
    workers: int = 1
    distributed: bool = False
    device_map: str | None = None
    gpus_per_rank: int = 1
    backend: str | None = None
    timeout: float = 1800.0
    extra_meta: dict = field(default_factory=dict)

    @property
    def parallel(self) -> bool:
        """Whether the job runs as ranks (torchrun or ``--workers``) rather than in this one process."""
        return self.distributed or self.workers > 1


def job_from_args(args: argparse.Namespace, *, distributed: bool = False) -> CalibrationJob:
    """A checked :class:`CalibrationJob`; raises :class:`ConfigError` naming what to change.

    ``distributed``: the arguments came to the torchrun entry point (``python -m topθ_core.distributed``).
    In one process (and ``toptheta calibrate --workers N``) the device defaults to the CPU.
    """
    distributed = distributed or args.distributed
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be at least 1")
    if args.gpus_per_rank < 1:
        raise ConfigError(f"--gpus-per-rank must be at least 1, got {args.gpus_per_rank}")
    parallel = distributed or args.workers > 1
    if not parallel and (args.device_map or args.backend):
        raise ConfigError("--device-map and --backend apply to distributed calibration (torchrun or --workers)")
    if parallel and args.allocate_head_k is not None:
        raise ConfigError("--allocate-head-k runs in one process: drop --workers/--distributed, or pass the "
                          "allocated schedule with --head-k")
    if parallel and args.sdc_source != SdcSource.TOP_K.value:
        raise ConfigError("distributed calibration computes the top-k SDC term only (--sdc-source top-k); "
                          "run --sdc-source theta in one process")
    if args.allocate_head_k is not None:
        if args.head_k:
            raise ConfigError("--allocate-head-k computes the per-head k itself: drop --head-k")
        if not (0.0 < args.allocate_head_k <= 1.0):
            raise ConfigError(f"--allocate-head-k takes a share of the softmax mass in (0, 1], got {args.allocate_head_k}")
    k = KSchedule.parse(args.k, args.layer_k, args.head_k)
    config = CalibrationConfig(k=k, placement=args.placement, sigma=args.sigma, tac=args.tac,
                               sample_frac=args.sample_frac, bin_width=args.bin_width, seed=args.seed, vmc=args.vmc,
                               sdc_source=args.sdc_source, aggregation=args.aggregation,
                               reservoir_capacity=args.reservoir_capacity, trim_fraction=args.trim_fraction,
                               theta_reference=args.theta_reference)
    intended = SparseConfig(selection=Selection.TOP_THETA, placement=args.placement,
                            sdc=args.sdc if args.placement == "pre" else "none", sdc_scale=args.sdc_scale,
                            vmc=args.placement == "post" or args.sdc != "none", capk=args.capk, k=k,
                            theta_reference=args.theta_reference)
    device = args.device
    if device is None and not distributed:
        device = "cpu"  # toptheta calibrate, also with --workers: the CLI's CPU default (torchrun: the rank's GPU)
    return CalibrationJob(model=args.model, data=args.data, out=args.out, config=config, intended=intended,
                          limit=args.limit, max_length=args.max_length, add_special_tokens=not args.no_special_tokens,
                          overwrite=args.overwrite, allocate_head_k=args.allocate_head_k, device=device,
                          dtype=args.dtype, workers=args.workers, distributed=distributed, device_map=args.device_map,
                          gpus_per_rank=args.gpus_per_rank, backend=args.backend, timeout=args.timeout,
                          extra_meta={"intended_sdc": args.sdc})


def torch_dtype(name: str, device: str | None):
    """``auto`` → float32 on CPU, bfloat16 on GPU; otherwise the named dtype."""
    import torch

    if name == "auto":
        cuda = device is not None and str(device).startswith("cuda")
        return torch.bfloat16 if cuda else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
