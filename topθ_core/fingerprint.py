"""The identity of a loaded model: what a threshold artifact records and inference checks."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelFingerprint:
    """Shape of a model plus a digest of its config and a sample of its weights."""

    name: str
    digest: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelFingerprint":
        return cls(**{k: d[k] for k in ("name", "digest", "n_layers", "n_heads", "n_kv_heads", "head_dim")})

    def describe(self) -> str:
        return f"{self.name} ({self.n_layers} layers, {self.n_heads}/{self.n_kv_heads} heads, digest {self.digest[:12]})"


def model_fingerprint(model: torch.nn.Module) -> ModelFingerprint:
    """Fingerprint of a transformers model: its shape plus a hash of its config and a weight sample."""
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    h = hashlib.sha256()
    for key in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "rope_theta"):
        h.update(f"{key}={getattr(cfg, key, None)};".encode())
    emb = model.get_input_embeddings().weight
    sample = emb.detach()[: min(64, emb.shape[0]), : min(64, emb.shape[1])].to(torch.float32).cpu()
    h.update(sample.numpy().round(5).tobytes())
    name = getattr(model.config, "topθ_name", None) or getattr(model.config, "name_or_path", "") or cfg.model_type
    return ModelFingerprint(name=str(name), digest=h.hexdigest(), n_layers=cfg.num_hidden_layers,
                            n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim)
