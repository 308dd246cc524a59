"""Decode-only mode (``SparseConfig.prefill = dense``): the prompt runs the model's dense attention,
decode steps run Top-θ.  Checked against the reference doing the same by hand: a dense prefill outside
any sparse run, then each decode step inside a sparse run of the same config with sparse prefill."""

from __future__ import annotations

import pytest
import torch

from topθ_core.calibration import calibrate
from topθ_core.config import CalibrationConfig, KSchedule, PrefillMode, SparseConfig
from topθ_core.integration import sparse_run
from topθ_core.metrics import SparsityMetrics, summarize
from topθ_core.models import cache_kwarg, output_cache

from topθ_core.tiny import TINY_TEXT


def _setup(tiny_lm):
    k = KSchedule(4)
    th = calibrate(tiny_lm, [TINY_TEXT, TINY_TEXT[::-1]], CalibrationConfig(k=k), max_length=96)
    cfg = SparseConfig(k=k)  # Top-θ, exact SDC, VMC: sparse from row length 5 on
    ids = tiny_lm.tokenizer(TINY_TEXT, return_tensors="pt").input_ids[:, :40]
    return th, cfg, ids


def _greedy(model, ids, steps, prefill_ctx, step_ctx):
    """Prefill ``ids`` in ``prefill_ctx()``, then ``steps`` greedy steps each in ``step_ctx()``: logits per step."""
    kw = cache_kwarg(model)
    with torch.inference_mode():
        with prefill_ctx():
            out = model(input_ids=ids, use_cache=True)
        logits = [out.logits[0, -1]]
        for _ in range(steps):
            nxt = logits[-1].argmax().view(1, 1)
            with step_ctx():
                out = model(input_ids=nxt, use_cache=True, **{kw: output_cache(out)})
            logits.append(out.logits[0, -1])
    return torch.stack(logits)


def test_dense_prefill_then_sparse_decode_equals_the_reference_doing_the_same(tiny_lm):
    th, cfg, ids = _setup(tiny_lm)
    model = tiny_lm.model
    decode_only = cfg.with_(prefill=PrefillMode.DENSE)
    import contextlib

    got = _greedy(model, ids, 8, lambda: sparse_run(decode_only, th, model=model),
                  lambda: sparse_run(decode_only, th, model=model))
    ref = _greedy(model, ids, 8, contextlib.nullcontext, lambda: sparse_run(cfg, th, model=model))
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    full = _greedy(model, ids, 8, lambda: sparse_run(cfg, th, model=model), lambda: sparse_run(cfg, th, model=model))
    dense = _greedy(model, ids, 8, contextlib.nullcontext, contextlib.nullcontext)
    # the prompt's next-token distribution is the dense one; full Top-θ changes it, and decode is sparse
    torch.testing.assert_close(got[0], dense[0], rtol=0, atol=0)
    assert not torch.equal(full[0], dense[0])
    assert not torch.equal(got[1:], dense[1:])


def test_decode_only_metrics_count_the_prompt_as_kept(tiny_lm):
    th, cfg, ids = _setup(tiny_lm)
    m = SparsityMetrics()
    with torch.inference_mode(), sparse_run(cfg.with_(prefill="dense"), th, model=tiny_lm.model, metrics=m):
        out = tiny_lm.model(input_ids=ids, use_cache=True)
        tiny_lm.model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True,
                      **{cache_kwarg(tiny_lm.model): output_cache(out)})
    df = m.to_frame()
    pre, dec = summarize(df, "prefill"), summarize(df, "decode")
    n = ids.shape[1]
    assert pre["kept_attention"] == 1.0 and pre["kept_v_rows"] == 1.0
    assert int(df[df["phase"] == "prefill"]["visible"].sum()) == 3 * 4 * n * (n + 1) // 2  # layers × heads × triangle
    assert pre["size_factor"] > 1.0  # dense keeps more than top-k would
    assert dec["kept_attention"] < 1.0  # the decode step is sparse


def test_prefill_flag_reaches_the_config():
    from topθ_core.cli import _sparse_config, build_parser

    args = build_parser().parse_args(["generate", "--prompt", "x", "--selection", "top-k", "--k", "8",
                                      "--prefill", "dense"])
    cfg = _sparse_config(args, None)
    assert cfg.prefill is PrefillMode.DENSE and "dense-prefill" in cfg.label()
    default = _sparse_config(build_parser().parse_args(["generate", "--prompt", "x", "--selection", "top-k"]), None)
    assert default.prefill is PrefillMode.TOP_THETA == SparseConfig().prefill


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_only_through_the_kernels_on_gpu(dtype):
    """On CUDA the prompt runs SDPA and the decode steps the Triton kernel (its running V sum built from the
    cache the prompt left): greedy logits equal the reference doing the same by hand."""
    import contextlib

    from topθ_core.models import wrap_model
    from topθ_core.tiny import tiny_model, tiny_tokenizer

    lm = wrap_model(tiny_model("llama", num_hidden_layers=2, hidden_size=256, num_attention_heads=4,
                               num_key_value_heads=2).to("cuda", dtype), tiny_tokenizer(), name="tiny-gpu")
    k = KSchedule(8)
    th = calibrate(lm, [TINY_TEXT] * 2, CalibrationConfig(k=k), max_length=128)
    cfg = SparseConfig(k=k)
    ids = lm.tokenizer(TINY_TEXT, return_tensors="pt").input_ids[:, :96].cuda()
    model = lm.model
    got = _greedy(model, ids, 6, lambda: sparse_run(cfg.with_(prefill="dense"), th, model=model),
                  lambda: sparse_run(cfg.with_(prefill="dense"), th, model=model))
    ref = _greedy(model, ids, 6, contextlib.nullcontext, lambda: sparse_run(cfg, th, model=model))
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
