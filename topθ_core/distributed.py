"""Data-parallel calibration with ``torch.distributed``, launched by ``torchrun``.

Every rank runs :func:`calibrate_distributed` (or ``python -m topθ_core.distributed``)
on the same data.  The documents are sharded deterministically (:func:`shard_documents`,
balanced by token count); each rank accumulates the mergeable
:class:`~topθ_core.thresholds.ThresholdStats` of its shard with
:func:`~topθ_core.calibration.collect_stats`; one ``all_reduce(SUM)`` of the stacked float64
statistics merges them; rank 0 finalizes and writes the artifact atomically; every rank
returns the same :class:`~topθ_core.thresholds.Thresholds`.  With a robust aggregation
(median, trimmed mean) each rank also keeps a sample reservoir, drawn from its own key stream
of the seed (:func:`~topθ_core.thresholds.stream_seed` (seed, rank)); one ``all_gather``
brings every rank's reservoir to every rank, and each merges them in rank order
(:meth:`~topθ_core.thresholds.SampleReservoir.merge`): a uniform sample of all ranks' samples.

Equality with one process: each document is calibrated on its own (one forward, batch 1),
so with ``sample_frac = 1`` the merged statistics are the single-process sums in another
order: counts are exactly equal and θ / SDC terms equal to float64 rounding (plus whatever
the model's own kernels do differently between processes), whatever the number of ranks
and however the data splits.  Robust aggregations are equal too while no (layer, head,
length bin) has more samples than the reservoir holds; beyond that the kept sample depends
on the split (uniform either way).  With ``sample_frac < 1`` the row sampling is random and
biased by what the *same process* has seen so far, so results depend on the split: they
are statistically equivalent, not equal.  Trailing length bins that no rank calibrated are
dropped, so the artifact's shape does not depend on the split either.

Backends: NCCL when the model is on CUDA, gloo on CPU.  Control messages (who failed,
agreement on bins and data) always travel over a gloo group, so a rank that raises makes
*every* rank raise :class:`DistributedCalibrationError` naming the failed rank(s) and its
error, and a rank that does not arrive within ``timeout`` is reported by rank 0
(``monitored_barrier``).  Rank 0 writes only after the merge succeeded everywhere, so a
failed job leaves no artifact.

A model too large for one GPU: ``device_map="auto"`` spreads it over the rank's
``gpus_per_rank`` GPUs (accelerate); data parallelism then runs across such groups, e.g.
2 ranks × 4 GPUs on one 8-GPU node, or one rank per node across nodes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from .calibration import collect_stats, prepare_documents
from .calibration_job import CalibrationJob, add_calibration_arguments, job_from_args, torch_dtype
from .config import CalibrationConfig, ConfigError, SdcSource
from .datafiles import read_texts
from .fingerprint import model_fingerprint
from .models import as_module, model_device
from .thresholds import Thresholds
from .statistics import SampleReservoir, ThresholdStats, stream_seed

__all__ = ["DistributedCalibrationError", "RankInfo", "calibrate_distributed", "load_rank_model",
           "rank_info", "shard_documents", "summary_line", "main"]

DEFAULT_TIMEOUT = timedelta(minutes=30)

ProgressFn = Callable[[int, int], None]


class DistributedCalibrationError(RuntimeError):
    """A distributed calibration that failed on some rank, timed out, or lost a rank.

    ``agreed`` is True when every rank raised this same error (the failure was reported
    through the control group); False when this rank could not reach the others.
    """

    def __init__(self, message: str, *, agreed: bool = False):
        super().__init__(message)
        self.agreed = agreed


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job (torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1


def rank_info() -> RankInfo:
    """This process's place: from the initialized process group, else torchrun's environment, else 1 rank."""
    env = os.environ
    local_rank = int(env.get("LOCAL_RANK", 0))
    local_world = int(env.get("LOCAL_WORLD_SIZE", 1))
    if dist.is_available() and dist.is_initialized():
        return RankInfo(dist.get_rank(), dist.get_world_size(), local_rank, local_world)
    return RankInfo(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), local_rank, local_world)


def shard_documents(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Deterministic split of documents over ranks, balanced by token count.

    Longest-first greedy: documents sorted by (length descending, index) go one by one to the
    rank with the fewest tokens so far (lowest rank on ties).  Returns, per rank, the
    document indices in their original order; ranks may get none when there are fewer
    documents than ranks.  The heaviest rank exceeds the average by at most one document.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    load = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda j: (-int(lengths[j]), j)):
        r = min(range(world_size), key=lambda q: (load[q], q))
        shards[r].append(i)
        load[r] += int(lengths[i])
    return [sorted(s) for s in shards]


# ---- process group and the control plane ------------------------------------------------

class _Comm:
    """The process group this calibration uses, plus a gloo group for control messages."""

    def __init__(self, backend: str | None, timeout: timedelta, device: torch.device | None):
        self.timeout = timeout
        self.owns_group = False
        self.info = rank_info()
        self.device = device  # where the model's statistics live (set once the model is placed)
        if self.info.world_size == 1 and not dist.is_initialized():
            self.backend, self.ctrl = "none", None
            return
        if not dist.is_available():
            raise DistributedCalibrationError("this PyTorch build has no torch.distributed")
        if not dist.is_initialized():
            backend = backend or ("nccl" if device is not None and device.type == "cuda" else "gloo")
            if backend == "nccl" and device is not None:
                torch.cuda.set_device(device)
            try:
                dist.init_process_group(backend=backend, timeout=timeout)
            except Exception as e:  # rendezvous failures come as several types
                raise DistributedCalibrationError(
                    f"rank {self.info.rank}: could not join the process group ({type(e).__name__}: {e}); "
                    "launch with torchrun and check MASTER_ADDR/MASTER_PORT or --rdzv-endpoint") from e
            self.owns_group = True
        self.info = rank_info()
        self.backend = dist.get_backend()
        self.ctrl = None if self.backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)

    @property
    def world(self) -> int:
        return self.info.world_size

    def close(self) -> None:
        if not dist.is_initialized():
            return
        try:
            if self.owns_group:
                dist.destroy_process_group()
            elif self.ctrl is not None:
                dist.destroy_process_group(self.ctrl)
        except Exception:  # a broken group after a failure: nothing left to release
            pass

    def agree(self, stage: str, error: BaseException | None, payload: Any = None) -> list[Any]:
        """Synchronise every rank; if any rank failed, raise the same error on all of them.

        Returns every rank's ``payload`` (in rank order).  Waits at most ``timeout`` for the
        others; rank 0 names the ranks that did not arrive.
        """
        msg = None if error is None else f"{type(error).__name__}: {error}"
        if self.world == 1:
            if error is not None:
                raise DistributedCalibrationError(f"{stage} failed: {msg}; no artifact was written",
                                                  agreed=True) from error
            return [payload]
        rank = self.info.rank
        try:
            dist.monitored_barrier(group=self.ctrl, timeout=self.timeout, wait_all_ranks=True)
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, (msg, payload), group=self.ctrl)
        except Exception as e:
            raise DistributedCalibrationError(f"rank {rank}: {stage}: {self._explain(e)}; no artifact was written") from e
        failed: dict[str, list[int]] = {}
        for r, (m, _) in enumerate(gathered):
            if m is not None:
                failed.setdefault(m, []).append(r)
        if failed:
            parts = [f"{_ranks_text(rs)}: {m}" for m, rs in failed.items()]
            raise DistributedCalibrationError(f"{stage} failed on {'; '.join(parts)}; no artifact was written",
                                              agreed=True) from error
        return [p for _, p in gathered]

    def _explain(self, e: BaseException) -> str:
        """A one-line reason for a failed control-plane collective (gloo's messages are long)."""
        text = " ".join(str(e).split())
        secs = f"{self.timeout.total_seconds():g} s"
        late = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", text)
        if late:
            ranks = [int(r) for r in re.findall(r"\d+", late.group(1))]
            return (f"{_ranks_text(ranks)} did not arrive within "
                    f"{secs} (hung, much slower than the others, or dead; raise the timeout for very uneven data)")
        if "successfully reached monitoredBarrier" in text:
            return (f"rank 0 found a rank that did not arrive within {secs} or died (rank 0's error names it)")
        if re.search(r"[Cc]onnection (closed|reset|refused)|[Bb]roken pipe", text):
            return "lost contact with another rank: it probably died (see its log)"
        if re.search(r"[Tt]ime(d)? ?out", text):
            return f"the other ranks did not answer within {secs}"
        return f"the control group failed ({type(e).__name__}: {text[:300]})"

    def all_reduce_sum(self, t: torch.Tensor, stage: str) -> torch.Tensor:
        if self.world == 1:
            return t
        comm_dev = torch.device("cuda", torch.cuda.current_device()) if "nccl" in self.backend else torch.device("cpu")
        buf = t.to(comm_dev)
        try:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        except Exception as e:
            raise DistributedCalibrationError(
                f"rank {self.info.rank}: {stage}: the all_reduce failed ({type(e).__name__}: {e}); "
                "no artifact was written") from e
        return buf

    def all_gather(self, t: torch.Tensor, stage: str) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape and dtype everywhere), in rank order."""
        if self.world == 1:
            return [t]
        comm_dev = torch.device("cuda", torch.cuda.current_device()) if "nccl" in self.backend else torch.device("cpu")
        buf = t.to(comm_dev)
        out = [torch.empty_like(buf) for _ in range(self.world)]
        try:
            dist.all_gather(out, buf)
        except Exception as e:
            raise DistributedCalibrationError(
                f"rank {self.info.rank}: {stage}: the all_gather failed ({type(e).__name__}: {e}); "
                "no artifact was written") from e
        return out


def _ranks_text(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


# ---- model placement ----------------------------------------------------------------------

def _rank_gpus(info: RankInfo, gpus_per_rank: int) -> list[int]:
    """The CUDA device indices this rank owns: ``LOCAL_RANK·G … LOCAL_RANK·G + G − 1``."""
    n = torch.cuda.device_count()
    if n == gpus_per_rank:  # the launcher already gave each rank its own GPUs (CUDA_VISIBLE_DEVICES)
        return list(range(n))
    first = info.local_rank * gpus_per_rank
    if first + gpus_per_rank > n:
        raise DistributedCalibrationError(
            f"rank {info.rank} (local rank {info.local_rank}) needs GPUs {first}..{first + gpus_per_rank - 1} "
            f"but this node has {n}; use --nproc-per-node {max(1, n // gpus_per_rank)} or fewer GPUs per rank")
    return list(range(first, first + gpus_per_rank))


def _default_dtype(cuda: bool) -> torch.dtype:
    return torch.bfloat16 if cuda else torch.float32


def load_rank_model(spec: str | os.PathLike, *, device: torch.device | str | None = None,
                    device_map: str | None = None, gpus: Sequence[int] = (), dtype: torch.dtype | None = None):
    """Load a model spec (``"smollm2"`` or a checkpoint directory) for this rank.

    Without ``device_map`` the whole model goes to ``device`` (:func:`~topθ_core.models.load_model`).
    With ``device_map="auto"`` accelerate spreads it over the CUDA devices ``gpus`` only
    (never CPU or disk: a model that does not fit is an error).  Returns a
    :class:`~topθ_core.models.LoadedModel`.
    """
    from .models import ModelLoadError, load_model, resolve_model_path, wrap_model

    cuda = (device is not None and torch.device(device).type == "cuda") or bool(gpus)
    dtype = dtype or _default_dtype(cuda)
    if device_map is None:
        return load_model(spec, device=device or "cpu", dtype=dtype)
    if device_map != "auto":
        raise ConfigError(f"device_map={device_map!r}: only 'auto' is supported")
    if not gpus:
        raise ConfigError("device_map='auto' needs CUDA GPUs for this rank")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, name = resolve_model_path(spec)
    max_memory = {g: int(torch.cuda.mem_get_info(g)[0] * 0.9) for g in gpus}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto", max_memory=max_memory)
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load a causal LM from {path}: {e}") from None
    placed = {_gpu_index(d) for d in getattr(model, "hf_device_map", {}).values()}
    off = sorted(str(d) for d in placed if d not in gpus)
    if off:
        raise ModelLoadError(f"{name} does not fit on GPUs {list(gpus)} (parts went to {off}); "
                             "use more GPUs per rank (--gpus-per-rank)")
    return wrap_model(model, tok, name)


def _gpu_index(d) -> int | str:
    """accelerate's device-map value (0, 'cuda:0', torch.device('cuda', 0), 'cpu', 'disk') → GPU index or name."""
    if isinstance(d, int):
        return d
    if isinstance(d, str) and not d.startswith("cuda"):
        return d
    dev = torch.device(d)
    return (dev.index or 0) if dev.type == "cuda" else str(dev)


# ---- the calibration ----------------------------------------------------------------------

def _data_digest(docs: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for d in docs:
        a = d.to(torch.int64).cpu().contiguous().numpy()
        h.update(len(a).to_bytes(8, "little"))
        h.update(a.tobytes())
    return h.hexdigest()


def _documents(data, tokenizer, max_length: int | None, add_special_tokens: bool,
               limit: int | None = None) -> list[torch.Tensor]:
    """Same document rules as :func:`~topθ_core.calibration.calibrate` (after ``limit``, as ``--limit``)."""
    if isinstance(data, str) and data.startswith("bundled:"):
        from .tasks import load_corpus

        data = load_corpus(data.split(":", 1)[1])
    elif isinstance(data, (str, os.PathLike)):
        data = read_texts(data)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        data = data[:limit]
    docs = prepare_documents(data, tokenizer, max_length, add_special_tokens)
    return docs


def _stack(stats: ThresholdStats, n_bins: int) -> torch.Tensor:
    """(4, n_layers, n_heads, n_bins) float64: count, Σt, Σt², ΣD_U, zero-padded to ``n_bins`` exactly."""
    out = torch.zeros(4, stats.n_layers, stats.n_heads, n_bins, dtype=torch.float64, device=stats.count.device)
    nb = stats.n_bins
    out[..., :nb] = torch.stack(stats.tensors())
    return out


def _unstack(stacked: torch.Tensor, like: ThresholdStats, rows_seen: int) -> ThresholdStats:
    """Merged statistics with trailing never-calibrated bins dropped (shape independent of the split)."""
    used = torch.nonzero(stacked[0].sum((0, 1)) > 0)
    n_bins = int(used.max()) + 1 if used.numel() else 1
    merged = ThresholdStats(like.n_layers, like.n_heads, like.bin_width, n_bins=n_bins, device="cpu")
    merged.count, merged.t_sum, merged.t_sumsq, merged.du_sum = stacked[..., :n_bins].cpu().clone().unbind(0)
    merged.rows_seen = rows_seen
    return merged


def _stack_samples(stats: ThresholdStats, n_bins: int) -> torch.Tensor:
    """(2, n_layers, n_heads, n_bins, capacity) float64: reservoir keys and values (both exact in float64)."""
    res = stats.samples
    res.ensure_bins(n_bins)
    return torch.stack([res.keys[:, :, :n_bins].to(torch.float64), res.values[:, :, :n_bins].to(torch.float64)])


def _merge_samples(gathered: list[torch.Tensor], config: CalibrationConfig, n_bins: int) -> SampleReservoir:
    """Every rank's reservoir (from :func:`_stack_samples`), merged in rank order, cut to ``n_bins``."""
    merged = None
    for rank, packed in enumerate(gathered):
        keys, values = packed.cpu()
        part = SampleReservoir(*keys.shape[:2], 0, keys.shape[-1], seed=stream_seed(config.seed, rank))
        part.keys, part.values = keys.to(torch.int32), values.to(torch.float32)
        merged = part if merged is None else merged.merge(part)
    merged.truncate_bins(n_bins)
    return merged


def calibrate_distributed(
    model,
    data,
    config: CalibrationConfig | None = None,
    out: str | os.PathLike | None = None,
    *,
    tokenizer=None,
    max_length: int | None = None,
    limit: int | None = None,
    add_special_tokens: bool = True,
    data_description: str | None = None,
    overwrite: bool = False,
    backend: str | None = None,
    timeout: float | timedelta = DEFAULT_TIMEOUT,
    device: str | torch.device | None = None,
    device_map: str | None = None,
    gpus_per_rank: int = 1,
    dtype: torch.dtype | None = None,
    progress: ProgressFn | None = None,
    extra_meta: dict | None = None,
) -> Thresholds:
    """Calibrate on every rank of a ``torchrun`` job and merge; call it on every rank.

    Args:
        model: a model spec (``"smollm2"`` or a checkpoint directory, loaded on this rank's
            device, see ``device``), a
            :class:`~topθ_core.models.LoadedModel`, or a prepared transformers model
            (already placed by the caller, e.g. with ``device_map``).
        data: texts, 1-D token-id tensors, a data file path (read on every rank: every node
            needs the same file; ranks that see different data are refused), or
            ``"bundled:NAME"`` (a bundled corpus).
        config: the calibration config (defaults as :class:`CalibrationConfig`).
        max_length, limit: truncate documents to ``max_length`` tokens; use the first ``limit``.
        out: artifact directory rank 0 writes atomically after a successful merge (None: no file).
        timeout: how long a rank waits for the others at a synchronisation point (the
            merge waits for the slowest rank's shard) and the process group's timeout.
        device: where a model spec is loaded: ``None`` (this rank's GPU ``cuda:LOCAL_RANK`` when
            CUDA is available, else CPU), ``"cuda"`` (this rank's GPU), ``"cuda:N"`` or ``"cpu"``.
            The backend follows: NCCL for CUDA, gloo for CPU, unless ``backend`` says otherwise.
        device_map: ``"auto"`` spreads a model spec over this rank's ``gpus_per_rank`` GPUs
            (``cuda:LOCAL_RANK·G`` … ``cuda:LOCAL_RANK·G+G−1``).
        dtype: weights dtype for a model spec (default bfloat16 on GPU, float32 on CPU).
        progress: ``progress(done_tokens, total_tokens)`` of this rank's shard.
        extra_meta: more provenance for the artifact's ``meta.json``.

    Returns the same :class:`Thresholds` on every rank.  Raises
    :class:`DistributedCalibrationError` on every rank when any rank fails (naming it and
    its error) or does not arrive within ``timeout``; nothing is written then.
    Without torchrun (no ``WORLD_SIZE``) it runs as a job of one process.
    """
    config = config or CalibrationConfig()
    if config.sdc_source is not SdcSource.TOP_K:
        raise ValueError("distributed calibration computes the top-k SDC term only (sdc_source=top-k); "
                         "run calibrate_sdc_under_theta on the merged thresholds for sdc_source=theta")
    if not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    if gpus_per_rank < 1:
        raise ConfigError(f"gpus_per_rank must be at least 1, got {gpus_per_rank}")
    info = rank_info()
    is_spec = isinstance(model, (str, os.PathLike))
    gpus: list[int] = []
    if is_spec:
        want = torch.device(device) if device is not None else None
        if want is not None and want.type not in ("cpu", "cuda"):
            raise ConfigError(f"device={device!r}: use 'cpu', 'cuda' or 'cuda:N'")
        if device_map == "auto" or (want is None and torch.cuda.is_available()) or (want is not None and want.type == "cuda"):
            if not torch.cuda.is_available():
                raise ConfigError(f"device={device!r} / device_map={device_map!r} need CUDA, which is not available")
            if want is not None and want.type == "cuda" and want.index is not None and device_map is None:
                gpus = [want.index]
            else:
                gpus = _rank_gpus(info, gpus_per_rank if device_map == "auto" else 1)
        device = torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")
    else:
        device = model_device(as_module(model))
    job = _RankJob(model=model, is_spec=is_spec, data=data, config=config, out=None if out is None else Path(out),
                   device=device, gpus=tuple(gpus), tokenizer=tokenizer, max_length=max_length, limit=limit,
                   add_special_tokens=add_special_tokens, data_description=data_description, overwrite=overwrite,
                   device_map=device_map, dtype=dtype, progress=progress, extra_meta=dict(extra_meta or {}))
    comm = _Comm(backend, timeout, device)
    try:
        return _run(comm, job)
    finally:
        comm.close()


@dataclass(frozen=True)
class _RankJob:
    """What one rank of :func:`calibrate_distributed` works on (its arguments, resolved)."""

    model: Any
    is_spec: bool
    data: Any
    config: CalibrationConfig
    out: Path | None
    device: torch.device
    gpus: tuple[int, ...]
    tokenizer: Any
    max_length: int | None
    limit: int | None
    add_special_tokens: bool
    data_description: str | None
    overwrite: bool
    device_map: str | None
    dtype: torch.dtype | None
    progress: ProgressFn | None
    extra_meta: dict


def _run(comm: _Comm, job: _RankJob) -> Thresholds:
    info, config, out, tokenizer = comm.info, job.config, job.out, job.tokenizer

    # 1. the checkpoint: rank 0 first, then each node's first rank, then the rest, so that a
    #    first-use conversion (the bundled GGUF) happens once per file system
    if job.is_spec:
        from .models import resolve_model_path

        stages = (info.rank == 0, info.rank != 0 and info.local_rank == 0, info.local_rank != 0)
        for mine in stages:
            err = None
            if mine:
                try:
                    resolve_model_path(job.model)
                except Exception as e:
                    err = e
            comm.agree("preparing the model checkpoint", err)

    # 2. model, documents, shard, output check
    err, payload = None, None
    try:
        if job.is_spec:
            lm = load_rank_model(job.model, device=job.device, device_map=job.device_map, gpus=job.gpus, dtype=job.dtype)
        else:
            lm = job.model
        tokenizer = tokenizer or getattr(lm, "tokenizer", None)
        net = as_module(lm)
        fp = model_fingerprint(net)
        ks = config.k.as_list(fp.n_layers)
        docs = _documents(job.data, tokenizer, job.max_length, job.add_special_tokens, job.limit)
        lengths = [int(d.numel()) for d in docs]
        if max(lengths) <= min(ks):
            raise ValueError(f"every calibration document is at most {max(lengths)} tokens, not longer than the "
                             f"smallest k ({min(ks)}): no row would be thresholded; use longer texts or a smaller k")
        shard = shard_documents(lengths, comm.world)[info.rank]
        if info.rank == 0 and out is not None and out.exists() and not job.overwrite:
            raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
        payload = {"model": fp.digest, "data": _data_digest(docs)}
    except Exception as e:
        err = e
    everyone = comm.agree("loading the model and data", err, payload)
    for key, what in (("model", "models"), ("data", "calibration data")):
        values = {p[key] for p in everyone}
        if len(values) > 1:
            by = {v: [r for r, p in enumerate(everyone) if p[key] == v] for v in values}
            raise DistributedCalibrationError(
                f"the ranks hold different {what} ({'; '.join(_ranks_text(rs) for rs in by.values())}): every rank "
                "must load the same model and read the same data; no artifact was written", agreed=True)

    # 3. each rank's shard
    err, payload = None, None
    stats_device = model_device(net)
    stats = ThresholdStats.for_config(fp.n_layers, fp.n_heads, config, device=stats_device, stream=info.rank)
    shard_docs = [docs[i] for i in shard]
    t0 = time.perf_counter()
    try:
        if shard_docs:
            collect_stats(net, shard_docs, config, stats=stats, progress=job.progress)
        payload = {"n_bins": stats.n_bins, "rows": stats.rows_seen, "documents": len(shard_docs),
                   "tokens": sum(lengths[i] for i in shard), "seconds": time.perf_counter() - t0}
    except Exception as e:
        err = e
    everyone = comm.agree("collecting statistics", err, payload)

    # 4. merge: one all_reduce of the stacked statistics
    n_bins = max(p["n_bins"] for p in everyone)
    stacked = comm.all_reduce_sum(_stack(stats, n_bins), "merging statistics")
    merged = _unstack(stacked, stats, rows_seen=sum(p["rows"] for p in everyone))
    if stats.samples is not None:  # robust aggregation: every rank's reservoir, merged in rank order
        gathered = comm.all_gather(_stack_samples(stats, n_bins), "merging sample reservoirs")
        merged.samples = _merge_samples(gathered, config, merged.n_bins)
    seconds = time.perf_counter() - t0
    tokens = sum(lengths)
    extra = {
        "documents": len(docs), "tokens": tokens, "seconds": round(seconds, 3),
        "distributed": {"world_size": comm.world, "backend": comm.backend,
                        "rank_documents": [p["documents"] for p in everyone],
                        "rank_tokens": [p["tokens"] for p in everyone],
                        "rank_seconds": [round(p["seconds"], 3) for p in everyone]},
    }
    extra.update(job.extra_meta)
    description = job.data_description
    if description is None:
        description = Path(job.data).name if isinstance(job.data, (str, os.PathLike)) else ""
    th = merged.finalize(config.sigma, fingerprint=fp, k=config.k, placement=config.placement, calibration=config,
                         data=description, extra=extra)

    # 5. rank 0 writes; everyone learns whether it worked and returns rank 0's provenance
    err = None
    if info.rank == 0 and out is not None:
        try:
            th.save(out, overwrite=job.overwrite)
        except Exception as e:
            err = e
    metas = comm.agree("writing the artifact", err, th.meta if info.rank == 0 else None)
    th.meta = metas[0]
    return th


# ---- command line -------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m topθ_core.distributed", allow_abbrev=False,
        description="Data-parallel Top-θ calibration: every rank calibrates a shard, one all_reduce merges, "
                    "rank 0 writes the artifact.  Same flags as `toptheta calibrate`.")
    return add_calibration_arguments(p)


def summary_line(th: Thresholds, out: str | os.PathLike | None = None) -> str:
    """One line about a distributed calibration's result (what the command line prints on rank 0)."""
    m = th.meta
    d = m.get("distributed", {"world_size": 1, "backend": "none"})
    bins = int((th.count > 0).any(0).any(0).sum())
    rate = m["tokens"] / m["seconds"] if m.get("seconds") else float("nan")
    where = f"wrote {out}" if out is not None else "calibrated"
    return (f"{where}: {th.n_layers} layers x {th.n_heads} heads, {bins} length bins, {m['rows_sampled']} rows "
            f"from {m['tokens']} tokens of {m['documents']} documents on {d['world_size']} rank(s) "
            f"({d['backend']}) in {m['seconds']:.1f} s ({rate:.0f} tokens/s)")


def _progress_printer(every_s: float = 15.0) -> ProgressFn:
    """Rank 0's shard progress on stderr, at most every ``every_s`` seconds, and at the end."""
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= every_s:
            last[0] = now
            print(f"rank 0: {done}/{total} tokens of its shard ({100 * done / max(total, 1):.0f}%)",
                  file=sys.stderr, flush=True)

    return report


def launch_local(argv: Sequence[str], workers: int, *, grace_s: float = 30.0) -> int:
    """Run this module's job as ``workers`` local ranks, as ``torchrun --standalone`` would.

    Each rank is a ``python -m topθ_core.distributed`` process with the torchrun environment
    (rank, world size, a free local port) and ``OMP_NUM_THREADS`` = this process's torch threads
    / ``workers`` (at least 1).  When a rank exits with an error the others get ``grace_s`` to
    notice (they fail fast and clean up) before they are terminated; if the launcher itself stops
    (an exception, Ctrl-C, SIGTERM) it terminates every rank still running.  Returns 0, or the
    exit code of the first rank that failed (a signal as 128 + its number, as a shell reports it).
    """
    import signal
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    threads = max(1, torch.get_num_threads() // workers)
    procs: list = []
    failed: list[int] = []  # exit codes of failed ranks, in the order they were seen

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        for r in range(workers):
            env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(workers),
                       LOCAL_WORLD_SIZE=str(workers), GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       OMP_NUM_THREADS=str(threads))
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
            procs.append(subprocess.Popen([sys.executable, "-m", "topθ_core.distributed", *argv], env=env))
        failed_at = None
        alive = [True] * len(procs)
        while any(alive):
            for r, p in enumerate(procs):
                if alive[r] and p.poll() is not None:
                    alive[r] = False
                    if p.returncode != 0:
                        failed.append(p.returncode)
                        failed_at = failed_at or time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for r, p in enumerate(procs):
                    if alive[r]:
                        p.terminate()
            time.sleep(0.1)
    finally:
        signal.signal(signal.SIGTERM, previous)
        survivors = [p for p in procs if p.poll() is None]
        for p in survivors:
            p.terminate()
        for p in survivors:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
    if not failed:
        return 0
    return failed[0] if failed[0] > 0 else 128 - failed[0]


def run_job(job: CalibrationJob, argv: Sequence[str]) -> int:
    """Run a parallel calibration job: start ``job.workers`` local ranks (re-running this module with
    ``argv`` and the job's device), or, in a rank, calibrate its shard.  Returns the exit code."""
    info = rank_info()
    if job.workers > 1 and "WORLD_SIZE" not in os.environ:
        rank_argv = list(argv) + (["--device", job.device] if job.device else [])  # a later flag wins
        return launch_local(rank_argv, job.workers)
    try:
        th = calibrate_distributed(
            job.model, job.data, job.config, job.out, add_special_tokens=job.add_special_tokens,
            max_length=job.max_length, limit=job.limit, data_description=job.data, overwrite=job.overwrite,
            backend=job.backend, timeout=job.timeout, device=job.device, device_map=job.device_map,
            gpus_per_rank=job.gpus_per_rank, dtype=None if job.dtype == "auto" else torch_dtype(job.dtype, job.device),
            extra_meta=job.extra_meta, progress=_progress_printer() if info.rank == 0 else None)
    except DistributedCalibrationError as e:
        if info.rank == 0 or not e.agreed:
            print(f"error: {e}", file=sys.stderr)
        return 1
    if info.rank == 0:
        print(summary_line(th, job.out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        job = job_from_args(_parser().parse_args(argv), distributed=True)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_job(job, argv)


def exit_after(code: int) -> int:
    """Under several torchrun ranks, end this rank now with ``code`` (``os._exit`` once the output
    is flushed); in a single process, return ``code``.  Everything is already written (atomically)
    by then, and gloo's background threads can otherwise abort the interpreter's teardown
    ("terminate called without an active exception", SIGABRT) after a successful run."""
    sys.stdout.flush()
    sys.stderr.flush()
    if rank_info().world_size > 1:
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(exit_after(main()))
