"""Configuration: frozen dataclasses with Enums, validated on construction.

Two objects configure everything:

* :class:`SparseConfig` says how attention is sparsified at inference
  (selection, placement, compensations, k schedule, threshold lookup).
* :class:`CalibrationConfig` says how thresholds are calibrated
  (σ, top-k at calibration, row sampling, length binning) and carries the
  k schedule and placement the thresholds are made for.

Invalid combinations raise :class:`ConfigError` with a message that says what
to change; nothing is silently ignored.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields, replace
from typing import Mapping


class ConfigError(ValueError):
    """An invalid or inconsistent configuration."""


class Selection(str, enum.Enum):
    """Which attention elements are kept."""

    DENSE = "dense"  # keep every visible element
    TOP_K = "top-k"  # keep the k largest of each row
    TOP_THETA = "top-theta"  # keep elements whose score beats θ[layer, head, L]


class Placement(str, enum.Enum):
    """Where the selection compares: logits (pre) or dense probabilities (post)."""

    PRE = "pre"  # compare a_ij with θ; softmax over the kept set
    POST = "post"  # compare p_ij of the dense softmax; kept p are not renormalised


class SDC(str, enum.Enum):
    """Softmax denominator compensation: the estimate D̃_U of the dropped mass."""

    NONE = "none"
    EXACT = "exact"  # D̃_U = D_U
    EXP_THRESHOLD = "exp-threshold"  # D̃_U = |U| · e^(θ − m)
    OFFLINE = "offline"  # D̃_U = C[layer, head, L], calibrated mean of D_U


class EmptyRowFloor(str, enum.Enum):
    """What a row keeps when no visible element passes θ."""

    NONE = "none"  # keep nothing: probabilities are all zero (VMC then gives v̄)
    MAX = "max"  # keep the row's maximum element


class Lookup(str, enum.Enum):
    """How θ is read for a row length between or beyond calibrated bins."""

    INTERPOLATE = "interpolate"  # linear in L between calibrated bins, flat beyond
    NEAREST = "nearest"  # the nearest calibrated length bin (research-code parity)
    FIT_LOG = "fit-log"  # θ(L) = a + b·ln L per (layer, head), count-weighted least squares on the bins


class ThetaReference(str, enum.Enum):
    """What θ is compared with: the score itself, or the score minus its row's maximum.

    With ``row-max`` a row keeps element j iff ``a_ij − m_i > θ_rel[layer, head, L]`` (``m_i`` the
    maximum over the row's visible keys), and calibration records ``t − m`` instead of ``t``.
    Pre-softmax only.  A tiled kernel knows ``m_i`` only after the whole row (its running max
    grows tile by tile), so the prefill runs the reference path; the decode kernel reads every score
    before it compares and takes it (``topθ_core.kernels.kernel_variant``).
    """

    ABSOLUTE = "absolute"  # keep a_ij > θ (the paper's)
    ROW_MAX = "row-max"  # keep a_ij − max_j a_ij > θ_rel

    @classmethod
    def _missing_(cls, value):  # accept "row_max" as well as "row-max"
        if isinstance(value, str):
            for member in cls:
                if member.value == value.replace("_", "-").lower():
                    return member
        return None


class PrefillMode(str, enum.Enum):
    """How calls with more than one query row (the prompt, chunked prefill) are attended."""

    TOP_THETA = "top-theta"  # like every other call: the config's selection and compensations
    DENSE = "dense"  # decode-only mode: the prompt runs the model's dense attention (SDPA), decode steps are sparse


class SdcSource(str, enum.Enum):
    """Which dropped set the offline SDC term ``C[layer, head, L]`` is the mean mass of."""

    TOP_K = "top-k"  # D_U of the exact top-k (one calibration pass; the paper's)
    THETA = "theta"  # D_U of the set Top-θ actually drops (a second pass under Top-θ selection)


class Aggregation(str, enum.Enum):
    """How per-row threshold samples become one θ per (layer, head, length bin).

    Every variant yields a location and a scale, θ = location + σ·scale; the functions are
    ``topθ_core.thresholds.AGGREGATIONS``.  The robust ones read a fixed-capacity sample of
    each bin (:class:`~topθ_core.thresholds.SampleReservoir`), exact while a bin has at most
    ``CalibrationConfig.reservoir_capacity`` samples.
    """

    MEAN_STD = "mean-std"  # θ = mean + σ·std (population std), mergeable by addition
    MEDIAN = "median"  # θ = median + σ·1.4826·MAD (MAD = median |t − median|)
    TRIMMED_MEAN = "trimmed-mean"  # θ = trimmed mean + σ·std of the kept samples (trim_fraction off each end)

    @property
    def needs_samples(self) -> bool:
        """True when the aggregation reads the samples themselves, not only count, Σt and Σt²."""
        return self is not Aggregation.MEAN_STD


def enum_value(enum_cls: type[enum.Enum], name: str, value) -> enum.Enum:
    """``enum_cls(value)``, or a :class:`ConfigError` naming the setting and its choices."""
    try:
        return enum_cls(value)
    except ValueError:
        choices = ", ".join(e.value for e in enum_cls)
        raise ConfigError(f"{name}={value!r} is not one of: {choices}") from None


def config_to_dict(cfg) -> dict:
    """A frozen config as JSON-ready values: Enums by value, the k schedule by its own dict."""
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = v.value if isinstance(v, enum.Enum) else v.to_dict() if isinstance(v, KSchedule) else v
    return out


def config_from_dict(cls, d: Mapping):
    """The inverse of :func:`config_to_dict` (the constructor validates and coerces the Enums)."""
    d = dict(d)
    d["k"] = KSchedule.from_dict(d["k"])
    return cls(**d)


def _coerce_enums(cfg, **fields: type[enum.Enum]) -> None:
    """Turn a frozen config's string fields into their Enums, or refuse a value naming the choices."""
    for name, enum_cls in fields.items():
        object.__setattr__(cfg, name, enum_value(enum_cls, name, getattr(cfg, name)))


def _parse_k_entries(text: str | None, what: str, form: str, example: str, key_parts: int) -> dict:
    """``"KEY:K,KEY:K"`` with KEY one integer (``key_parts=1``) or two joined by a dot → {key: k}."""
    out: dict = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        key_s, sep, k_s = part.partition(":")
        keys = key_s.split(".")
        if not sep or len(keys) != key_parts:
            raise ConfigError(f"{what} entry {part!r} must look like {form}, e.g. {example}")
        try:
            key, k = tuple(int(x) for x in keys), int(k_s)
        except ValueError:
            raise ConfigError(f"{what} entry {part!r}: {form.replace(':', ' and ').replace('.', ', ')} must be "
                              "integers") from None
        name = f"layer {key[0]}" + (f" head {key[1]}" if key_parts == 2 else "")
        key = key[0] if key_parts == 1 else key
        if key in out:
            raise ConfigError(f"{what} gives {name} twice")
        out[key] = k
    return out


def parse_layer_k(text: str | None) -> dict[int, int]:
    """Parse ``"0:512,1:512"`` into ``{0: 512, 1: 512}``."""
    return _parse_k_entries(text, "layer-k", "LAYER:K", "0:512", 1)


def parse_head_k(text: str | None) -> dict[tuple[int, int], int]:
    """Parse ``"2.0:48,2.1:80"`` (LAYER.HEAD:K) into ``{(2, 0): 48, (2, 1): 80}``."""
    return _parse_k_entries(text, "head-k", "LAYER.HEAD:K", "2.0:48", 2)


@dataclass(frozen=True)
class KSchedule:
    """Target kept elements per row: ``default``, per layer ``overrides``, per (layer, head) ``head_overrides``.

    The k of query head ``h`` of layer ``l`` is ``head_overrides[(l, h)]`` if given, else
    ``overrides[l]`` if given, else ``default``.  A head's k decides which of its rows stay dense
    (``L ≤ k``), how many elements top-k keeps, and which score calibration records for it
    (its row's (k+1)-th largest).  ``head_overrides`` may be a mapping ``{(layer, head): k}``.
    """

    default: int = 64
    overrides: tuple[tuple[int, int], ...] = ()
    head_overrides: tuple[tuple[tuple[int, int], int], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.overrides, Mapping):  # allow KSchedule(64, {0: 512})
            object.__setattr__(self, "overrides", tuple(sorted(dict(self.overrides).items())))
        else:
            object.__setattr__(self, "overrides", tuple(sorted(tuple(x) for x in self.overrides)))
        items = self.head_overrides.items() if isinstance(self.head_overrides, Mapping) else self.head_overrides
        try:
            heads = [((int(cell[0]), int(cell[1])), int(k)) for cell, k in items]
        except (TypeError, ValueError, IndexError):
            raise ConfigError("head_overrides must be ((layer, head), k) pairs or a {(layer, head): k} mapping") from None
        if len({cell for cell, _ in heads}) != len(heads):
            raise ConfigError("head_overrides names a (layer, head) twice")
        object.__setattr__(self, "head_overrides", tuple(sorted(heads)))
        if self.default < 1:
            raise ConfigError(f"k must be at least 1, got {self.default}")
        for layer, k in self.overrides:
            if layer < 0:
                raise ConfigError(f"layer index must be non-negative, got {layer}")
            if k < 1:
                raise ConfigError(f"k for layer {layer} must be at least 1, got {k}")
        for (layer, head), k in self.head_overrides:
            if layer < 0 or head < 0:
                raise ConfigError(f"layer and head indices must be non-negative, got layer {layer} head {head}")
            if k < 1:
                raise ConfigError(f"k for layer {layer} head {head} must be at least 1, got {k}")

    @classmethod
    def parse(cls, default: int, layer_k: str | Mapping[int, int] | None = None,
              head_k: str | Mapping[tuple[int, int], int] | None = None) -> "KSchedule":
        overrides = parse_layer_k(layer_k) if isinstance(layer_k, str) or layer_k is None else dict(layer_k)
        heads = parse_head_k(head_k) if isinstance(head_k, str) or head_k is None else dict(head_k)
        return cls(default=default, overrides=tuple(sorted(overrides.items())), head_overrides=tuple(sorted(heads.items())))

    def k_for(self, layer: int) -> int:
        """The layer's k (heads without their own override use it)."""
        for layer_i, k in self.overrides:
            if layer_i == layer:
                return k
        return self.default

    def heads_for(self, layer: int, n_heads: int) -> list[int] | None:
        """Per query head k of ``layer`` (length ``n_heads``), or ``None`` when every head uses the layer's k."""
        own = {h: k for (l, h), k in self.head_overrides if l == layer}
        if not own:
            return None
        bad = [h for h in own if h >= n_heads]
        if bad:
            raise ConfigError(f"k schedule names head(s) {bad} of layer {layer}, but the layer has {n_heads} query heads")
        base = self.k_for(layer)
        ks = [own.get(h, base) for h in range(n_heads)]
        return None if all(k == base for k in ks) else ks

    def validate(self, n_layers: int, n_heads: int) -> None:
        """Refuse layers or heads the model does not have (:class:`ConfigError` naming them)."""
        self.as_list(n_layers)
        bad = sorted({(l, h) for (l, h), _ in self.head_overrides if l >= n_layers or h >= n_heads})
        if bad:
            raise ConfigError(f"k schedule names (layer, head) {bad[:5]}{' …' if len(bad) > 5 else ''}, but the model "
                              f"has {n_layers} layers of {n_heads} query heads")

    def as_list(self, n_layers: int) -> list[int]:
        bad = sorted({layer for layer, _ in self.overrides if layer >= n_layers}
                     | {layer for (layer, _), _ in self.head_overrides if layer >= n_layers})
        if bad:
            raise ConfigError(f"k schedule names layer(s) {bad} but the model has {n_layers} layers")
        return [self.k_for(i) for i in range(n_layers)]

    def to_text(self) -> str:
        return ",".join(f"{layer}:{k}" for layer, k in self.overrides)

    def head_text(self) -> str:
        """``head_overrides`` as ``LAYER.HEAD:K,…`` (what :func:`parse_head_k` reads)."""
        return ",".join(f"{layer}.{head}:{k}" for (layer, head), k in self.head_overrides)

    def to_dict(self) -> dict:
        d = {"default": self.default, "overrides": {str(l): k for l, k in self.overrides}}
        if self.head_overrides:  # written only when used: older readers keep reading per-layer schedules
            d["head_overrides"] = {f"{l}.{h}": k for (l, h), k in self.head_overrides}
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "KSchedule":
        heads = {}
        for cell, k in dict(d.get("head_overrides") or {}).items():
            layer_s, _, head_s = str(cell).partition(".")
            try:
                heads[(int(layer_s), int(head_s))] = int(k)
            except ValueError:
                raise ConfigError(f"head_overrides key {cell!r} must look like LAYER.HEAD") from None
        return cls(default=int(d["default"]), overrides=tuple(sorted((int(l), int(k)) for l, k in d["overrides"].items())),
                   head_overrides=tuple(sorted(heads.items())))


def allowed_sdc(selection: Selection, placement: Placement) -> tuple[SDC, ...]:
    """The SDC variants a selection and placement take (what :class:`SparseConfig` accepts).

    Post-softmax takes none (it already divides by the dense denominator); top-k has no θ, so
    no exp-threshold or offline term; dense ignores SDC.  Top-θ pre-softmax takes every variant.
    """
    selection, placement = Selection(selection), Placement(placement)
    if selection is Selection.DENSE:
        return tuple(SDC)
    if placement is Placement.POST:
        return (SDC.NONE,)
    if selection is Selection.TOP_K:
        return (SDC.NONE, SDC.EXACT)
    return tuple(SDC)


def fit_sdc(sdc: SDC | str, selection: Selection | str, placement: Placement | str) -> SDC:
    """``sdc`` if the selection and placement take it, else the closest they take (exact, else none)."""
    allowed = allowed_sdc(selection, placement)
    sdc = SDC(sdc)
    if sdc in allowed:
        return sdc
    return SDC.EXACT if SDC.EXACT in allowed else SDC.NONE


MAX_RESERVOIR_CAPACITY = 1 << 16  # samples per (layer, head, length bin); far beyond what a median needs

PAPER_K = KSchedule(default=64, overrides=((0, 512), (1, 512)))


@dataclass(frozen=True)
class SparseConfig:
    """How attention is sparsified at inference time.

    ``sdc_scale`` is the scale ``s`` of SDC: ``p̂ = e^(a−m) / (D_S + s·D̃_U)``.
    ``capk`` keeps at most k survivors per row, preferring the most recent positions.
    Rows with ``L ≤ k[layer]`` are always dense.

    Beyond the paper (all neutral by default unless stated; see ``kernel_compatible``):
    ``sink_tokens``: the first n visible positions of every thresholded row are always kept
    (attention sinks).  ``recent_tokens``: the last n visible positions (the diagonal is
    ``recent_tokens=1``) are always kept.  Both are position rules, tile-local in a kernel.
    ``theta_smoothing``: half-width in length bins of a count-weighted moving average of θ
    (and the SDC term) over neighbouring bins before lookup; 0 = none.
    ``theta_reference``: ``absolute`` keeps ``a > θ``; ``row-max`` keeps ``a − m > θ_rel`` (``m`` the
    row maximum), with θ_rel from thresholds calibrated the same way (the artifact records which).
    ``prefill``: ``dense`` is the decode-only mode: calls with more than one query row (the prompt)
    run the model's dense SDPA, so time to first token and the prompt's accuracy are dense; only
    decode steps are sparse.
    Per-(layer, head) k (``KSchedule.head_overrides``) moves each head's dense-row rule and top-k.

    The default SDC is ``exact``: the dropped mass summed per row from the scores the threshold
    compare computes anyway (why: ``benchmarks/results/fidelity.md``).
    """

    selection: Selection = Selection.TOP_THETA
    placement: Placement = Placement.PRE
    sdc: SDC = SDC.EXACT  # the best variant of the fidelity ablation (benchmarks/results/fidelity.md)
    sdc_scale: float = 1.0
    vmc: bool = True
    capk: bool = False
    empty_row: EmptyRowFloor = EmptyRowFloor.MAX
    k: KSchedule = field(default_factory=lambda: PAPER_K)
    lookup: Lookup = Lookup.INTERPOLATE
    sink_tokens: int = 0
    recent_tokens: int = 0
    theta_smoothing: int = 0
    theta_reference: ThetaReference = ThetaReference.ABSOLUTE
    prefill: PrefillMode = PrefillMode.TOP_THETA

    def __post_init__(self) -> None:
        for name in ("sink_tokens", "recent_tokens", "theta_smoothing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        _coerce_enums(self, selection=Selection, placement=Placement, sdc=SDC, empty_row=EmptyRowFloor, lookup=Lookup,
                      theta_reference=ThetaReference, prefill=PrefillMode)
        if not isinstance(self.k, KSchedule):
            raise ConfigError("k must be a KSchedule (use KSchedule.parse(64, '0:512,1:512'))")
        if not (self.sdc_scale >= 0.0):
            raise ConfigError(f"sdc_scale must be non-negative, got {self.sdc_scale}")
        if self.selection is Selection.DENSE:
            return  # compensation settings are irrelevant and harmless for dense
        if self.placement is Placement.POST and self.sdc is not SDC.NONE:
            raise ConfigError(
                "SDC applies to pre-softmax placement only: post-softmax already divides by the "
                "full dense denominator. Use placement=pre, or sdc=none."
            )
        if self.sdc not in allowed_sdc(self.selection, self.placement):
            raise ConfigError(
                f"sdc={self.sdc.value} needs calibrated thresholds, which top-k does not use. "
                "Use sdc=exact or none with top-k, or selection=top-theta."
            )
        if self.vmc and self.placement is Placement.PRE and self.sdc is SDC.NONE:
            raise ConfigError(
                "VMC with pre-softmax placement and no SDC does nothing (kept probabilities sum to 1). "
                "Enable an SDC variant, use post-softmax placement, or turn VMC off."
            )
        if self.selection is Selection.TOP_K and self.capk:
            raise ConfigError("capk only applies to top-theta selection (top-k already keeps k)")
        if self.selection is not Selection.TOP_THETA and (self.sink_tokens or self.recent_tokens):
            raise ConfigError("sink_tokens / recent_tokens apply to top-theta selection only")
        if self.theta_reference is ThetaReference.ROW_MAX:
            if self.selection is not Selection.TOP_THETA:
                raise ConfigError("theta_reference=row-max applies to top-theta selection only")
            if self.placement is not Placement.PRE:
                raise ConfigError("theta_reference=row-max compares logits minus the row max: use placement=pre "
                                  "(post-softmax probabilities are already relative to the row)")

    @property
    def kernel_compatible(self) -> bool:
        """True when both Triton kernels (prefill and decode) compute exactly this config's attention.

        Options that change which elements are kept beyond the paper's rule run the reference:
        always-kept sink or recent positions; per-head k (the kernels take one k per layer for the
        dense-row rule); θ relative to the row max in prefill (a tiled prefill has only a running max
        when it compares; the decode kernel reads every score first and does take it).  Options that
        only change θ or the SDC term values (lookup, smoothing, σ, the SDC source) are computed before
        the kernel and stay compatible.  Per call, ``topθ_core.kernels.kernel_variant`` decides.
        """
        return (self.sink_tokens == 0 and self.recent_tokens == 0
                and self.theta_reference is ThetaReference.ABSOLUTE and not self.k.head_overrides)

    @property
    def needs_thresholds(self) -> bool:
        return self.selection is Selection.TOP_THETA

    def with_(self, **changes) -> "SparseConfig":
        return replace(self, **changes)

    def label(self) -> str:
        """A short name that labels a plot or a table row by itself."""
        if self.selection is Selection.DENSE:
            return "dense"
        parts = [self.selection.value, f"k={self.k.default}"]
        if self.k.overrides:
            parts.append(f"[{self.k.to_text()}]")
        if self.k.head_overrides:
            parts.append(f"head-k×{len(self.k.head_overrides)}")
        parts.append(self.placement.value)
        if self.sdc is not SDC.NONE:
            parts.append(f"sdc={self.sdc.value}" + (f"x{self.sdc_scale:g}" if self.sdc_scale != 1.0 else ""))
        if self.vmc:
            parts.append("vmc")
        if self.capk:
            parts.append("capk")
        if self.empty_row is EmptyRowFloor.NONE:
            parts.append("nofloor")
        if self.selection is Selection.TOP_THETA and self.lookup is not Lookup.INTERPOLATE:
            parts.append(self.lookup.value)
        if self.theta_reference is not ThetaReference.ABSOLUTE:
            parts.append(f"θ-{self.theta_reference.value}")
        if self.theta_smoothing:
            parts.append(f"smooth={self.theta_smoothing}")
        if self.sink_tokens:
            parts.append(f"sink={self.sink_tokens}")
        if self.recent_tokens:
            parts.append(f"recent={self.recent_tokens}")
        if self.prefill is PrefillMode.DENSE:
            parts.append("dense-prefill")
        return " ".join(parts)

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "SparseConfig":
        return config_from_dict(cls, d)


DENSE = SparseConfig(selection=Selection.DENSE, sdc=SDC.NONE, vmc=False)


@dataclass(frozen=True)
class CalibrationConfig:
    """How thresholds are calibrated.

    ``sigma``: θ = mean(t) + σ·std(t) (with ``aggregation`` mean-std; see below).  ``tac``:
    top-k at calibration (each thresholded row is replaced by its exact top-k so later layers
    see sparse activations).
    ``sample_frac``: fraction of eligible rows sampled per attention call, biased to the
    length bins seen least so far.  ``bin_width``: length-bin width in tokens
    (1 = per exact length, research-code parity).  ``sdc_source``: the offline SDC term is
    the mean dropped mass of top-k (one pass) or of Top-θ itself (a second pass that runs
    Top-θ with the first pass's θ and records ``D_U`` of the set it actually drops).
    ``aggregation``: mean-std (default), median (θ = median + σ·1.4826·MAD) or trimmed-mean
    (θ = mean + σ·std of the samples left after cutting ``trim_fraction`` off each end).  The
    robust two keep a uniform sample of at most ``reservoir_capacity`` threshold samples per
    (layer, head, length bin), exact while a bin has no more; that costs
    8 bytes · layers · heads · bins · capacity while calibrating (mean-std keeps none).
    ``theta_reference``: ``row-max`` records each row's (k+1)-th largest logit minus the row's
    maximum, so θ_rel = mean(t − m) + σ·std(t − m) (pre-softmax only); the artifact's meta says which.
    """

    k: KSchedule = field(default_factory=lambda: PAPER_K)
    placement: Placement = Placement.PRE
    sigma: float = 0.1
    tac: bool = True
    sample_frac: float = 1.0
    bin_width: int = 16
    aggregation: Aggregation = Aggregation.MEAN_STD
    seed: int = 0
    vmc: bool = True  # compensation used on TAC rows while calibrating (exact SDC stands in)
    sdc_source: SdcSource = SdcSource.TOP_K
    reservoir_capacity: int = 128
    trim_fraction: float = 0.1
    theta_reference: ThetaReference = ThetaReference.ABSOLUTE

    def __post_init__(self) -> None:
        _coerce_enums(self, placement=Placement, aggregation=Aggregation, sdc_source=SdcSource,
                      theta_reference=ThetaReference)
        if not isinstance(self.k, KSchedule):
            raise ConfigError("k must be a KSchedule")
        if not (0.0 < self.sample_frac <= 1.0):
            raise ConfigError(f"sample_frac must be in (0, 1], got {self.sample_frac}")
        if self.bin_width < 1:
            raise ConfigError(f"bin_width must be at least 1, got {self.bin_width}")
        if not (-10.0 <= self.sigma <= 10.0):
            raise ConfigError(f"sigma={self.sigma} is outside the sensible range [-10, 10]")
        if self.sdc_source is SdcSource.THETA and self.placement is Placement.POST:
            raise ConfigError("sdc_source=theta calibrates the pre-softmax SDC term; post-softmax uses no SDC")
        if self.theta_reference is ThetaReference.ROW_MAX and self.placement is not Placement.PRE:
            raise ConfigError("theta_reference=row-max calibrates logits minus the row max: use placement=pre")
        cap = self.reservoir_capacity
        if isinstance(cap, bool) or not isinstance(cap, int) or not (1 <= cap <= MAX_RESERVOIR_CAPACITY):
            raise ConfigError(f"reservoir_capacity must be an integer in [1, {MAX_RESERVOIR_CAPACITY}] "
                              f"(samples kept per layer, head and length bin), got {cap!r}")
        if isinstance(self.trim_fraction, bool) or not isinstance(self.trim_fraction, (int, float)) \
                or not (0.0 <= self.trim_fraction < 0.5):
            raise ConfigError(f"trim_fraction must be in [0, 0.5) (the share cut off each end of a bin's samples), "
                              f"got {self.trim_fraction!r}")
        object.__setattr__(self, "trim_fraction", float(self.trim_fraction))

    def tac_config(self) -> SparseConfig:
        """The sparse config that top-k at calibration runs with (exact SDC stands in for offline)."""
        if self.placement is Placement.POST:
            return SparseConfig(selection=Selection.TOP_K, placement=Placement.POST, sdc=SDC.NONE,
                                vmc=self.vmc, k=self.k)
        return SparseConfig(selection=Selection.TOP_K, placement=Placement.PRE, sdc=SDC.EXACT,
                            vmc=self.vmc, k=self.k)

    def theta_pass_config(self, **overrides) -> SparseConfig:
        """The Top-θ config the second (``sdc_source=theta``) pass runs with."""
        cfg = SparseConfig(selection=Selection.TOP_THETA, placement=Placement.PRE, sdc=SDC.OFFLINE,
                           vmc=self.vmc, k=self.k, theta_reference=self.theta_reference)
        return cfg.with_(**overrides) if overrides else cfg

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "CalibrationConfig":
        return config_from_dict(cls, d)
