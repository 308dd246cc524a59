"""Top-θ inside real transformers models, through AttentionInterface only."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from topθ_core.tiny import tiny_model
from topθ_core.config import ConfigError, KSchedule, SparseConfig
from topθ_core.integration import ATTN_NAME, prepare_model, sparse_run
from topθ_core.metrics import SparsityMetrics, summarize
from topθ_core.models import wrap_model
from topθ_core.thresholds import ThresholdsError
from topθ_core.fingerprint import ModelFingerprint
from topθ_core.statistics import ThresholdStats

FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gemma2"]


def constant_thresholds(lm, value: float, max_len: int = 512, sdc: float = 0.0):
    """Thresholds with θ = ``value`` at every (layer, head, length) (−∞ stands as −1e30)."""
    value = max(value, -1e30)
    fp = lm.fingerprint
    stats = ThresholdStats(fp.n_layers, fp.n_heads, bin_width=max_len)
    for layer in range(fp.n_layers):
        stats.add(layer, torch.tensor([1]), torch.full((1, fp.n_heads), value, dtype=torch.float64),
                  torch.full((1, fp.n_heads), sdc, dtype=torch.float64))
    return stats.finalize(0.0, fingerprint=fp, k=KSchedule(1), placement="pre")


def _reference_model(family, model):
    """The model's own attention (sdpa; eager where sdpa cannot soft-cap)."""
    ref = tiny_model(family)
    ref.load_state_dict(model.state_dict())
    ref.set_attn_implementation("eager" if family == "gemma2" else "sdpa")
    return ref.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_theta_minus_inf_reproduces_model_logits_and_greedy_tokens(family):
    model = tiny_model(family)
    ref = _reference_model(family, model)
    lm = wrap_model(model, name=f"tiny-{family}")
    assert model.config._attn_implementation == ATTN_NAME
    ids = torch.randint(2, 300, (2, 70), generator=torch.Generator().manual_seed(3))
    th = constant_thresholds(lm, float("-inf"))
    cfg = SparseConfig(selection="top-theta", sdc="none", vmc=False, k=KSchedule(4))
    with torch.no_grad():
        expected = ref(ids).logits
        dense = model(ids).logits
        with sparse_run(cfg, th, model=model):
            sparse = model(ids).logits
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse, expected, rtol=1e-4, atol=1e-4)
    gen_kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = ref.generate(ids[:1, :20], **gen_kw)
        with sparse_run(cfg, th, model=model):
            got = model.generate(ids[:1, :20], **gen_kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_top_k_at_least_length_equals_dense_in_model(family):
    model = tiny_model(family)
    wrap_model(model)
    ids = torch.randint(2, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
        with sparse_run(SparseConfig(selection="top-k", sdc="none", vmc=False, k=KSchedule(40)), model=model):
            topk = model(ids).logits
        with sparse_run(SparseConfig(selection="top-k", sdc="none", vmc=False, k=KSchedule(8)), model=model):
            topk8 = model(ids).logits
    torch.testing.assert_close(topk, dense, rtol=1e-5, atol=1e-5)
    assert (topk8 - dense).abs().max() > 1e-3  # sparsity does act


def test_generate_with_kv_cache_equals_full_recompute_under_sparse_run(tiny_lm):
    """Decode rows through the cache are the same rows a full forward computes."""
    th = constant_thresholds(tiny_lm, 0.05, sdc=0.3)
    cfg = SparseConfig(k=KSchedule(4))
    ids = torch.randint(2, 300, (1, 16), generator=torch.Generator().manual_seed(5))
    model = tiny_lm.model
    with torch.no_grad(), sparse_run(cfg, th, model=model):
        out = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        full = model(out).logits
    greedy_again = full[0, 15:-1].argmax(-1)
    assert torch.equal(greedy_again, out[0, 16:])


def test_decode_looks_theta_up_once_per_step_for_all_layers(tiny_lm, monkeypatch):
    """A decode step's rows have one length in every layer: θ is looked up once per step (all layers)
    and each layer takes its slice; the logits equal those of a per-layer lookup."""
    import topθ_core.integration as integration
    from topθ_core.calibration import calibrate
    from topθ_core.config import CalibrationConfig

    g = torch.Generator().manual_seed(2)
    th = calibrate(tiny_lm, [torch.randint(2, 300, (n,), generator=g) for n in (48, 64)],
                   CalibrationConfig(k=KSchedule(4), bin_width=4))
    calls = []
    real = type(th).lookup
    monkeypatch.setattr(type(th), "lookup", lambda self, layer, *a, **kw: calls.append(layer) or real(self, layer, *a, **kw))
    ids = torch.randint(2, 300, (1, 20), generator=g)
    model = tiny_lm.model

    def run() -> list[torch.Tensor]:
        with torch.no_grad(), sparse_run(SparseConfig(k=KSchedule(4)), th, model=model):
            out = model(ids, use_cache=True)
            logits = [out.logits[:, -1]]
            for _ in range(5):
                out = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
                logits.append(out.logits[:, -1])
        return logits

    cached = run()
    n_layers = tiny_lm.fingerprint.n_layers
    assert calls.count(None) == 6 and len(calls) == 6  # the prefill's 20 rows and 5 steps: one lookup each
    calls.clear()
    monkeypatch.setattr(integration, "LOOKUP_ALL_LAYERS_MAX_ROWS", 0)
    per_layer = run()
    assert calls == list(range(n_layers)) * 6
    for a, b in zip(cached, per_layer):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_left_padded_batch_matches_one_by_one_through_the_model(tiny_lm):
    th = constant_thresholds(tiny_lm, 0.02, sdc=0.5)
    cfg = SparseConfig(k=KSchedule(3), capk=True)
    model = tiny_lm.model
    g = torch.Generator().manual_seed(9)
    a, b = torch.randint(2, 300, (1, 30), generator=g), torch.randint(2, 300, (1, 18), generator=g)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 12, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 30, dtype=torch.long), torch.cat([torch.zeros(1, 12), torch.ones(1, 18)], 1).long()])
    with torch.no_grad(), sparse_run(cfg, th, model=model):
        both = model(batch, attention_mask=mask).logits
        la = model(a).logits
        lb = model(b).logits
    torch.testing.assert_close(both[0], la[0], rtol=1e-4, atol=1e-4)
    # position ids differ for a left-padded row only if the model derives them from the mask; compare with them aligned
    with torch.no_grad(), sparse_run(cfg, th, model=model):
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        both = model(batch, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(both[1, 12:], lb[0], rtol=1e-4, atol=1e-4)


def test_two_threads_with_different_settings_share_one_model(tiny_lm):
    """Settings travel in a ContextVar: concurrent callers of one model never see each other's."""
    model = tiny_lm.model
    ids = torch.randint(2, 300, (1, 48), generator=torch.Generator().manual_seed(1))
    th = constant_thresholds(tiny_lm, 0.1, sdc=0.2)
    cfgs = {"dense": None, "k4": SparseConfig(k=KSchedule(4)), "k16": SparseConfig(k=KSchedule(16))}
    expected = {}
    with torch.no_grad():
        for name, cfg in cfgs.items():
            if cfg is None:
                expected[name] = model(ids).logits
            else:
                with sparse_run(cfg, th, model=model):
                    expected[name] = model(ids).logits
    results, errors = {}, []
    barrier = threading.Barrier(3)

    def worker(name, cfg):
        try:
            barrier.wait()
            outs = []
            for _ in range(3):
                with torch.no_grad():
                    if cfg is None:
                        outs.append(model(ids).logits)
                    else:
                        with sparse_run(cfg, th, model=model):
                            outs.append(model(ids).logits)
            results[name] = outs
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n, c)) for n, c in cfgs.items()]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    for name, outs in results.items():
        for o in outs:
            torch.testing.assert_close(o, expected[name])
    assert (expected["k4"] - expected["dense"]).abs().max() > 1e-3


def test_metrics_count_kept_elements_and_v_rows(tiny_lm):
    model = tiny_lm.model
    ids = torch.randint(2, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    met = SparsityMetrics(track_popularity=True)
    with torch.no_grad(), sparse_run(SparseConfig(selection="top-k", sdc="none", vmc=False, k=KSchedule(5)),
                                     model=model, metrics=met):
        out = model(ids, use_cache=True)
        model(ids[:, :1], past_key_values=out.past_key_values)
    df = met.to_frame()
    pre = df[df.phase == "prefill"]
    # exactly Σ min(L, k) kept per head for top-k, of Σ L visible
    assert (pre["kept"] == sum(min(L, 5) for L in range(1, 41))).all()
    assert (pre["visible"] == sum(range(1, 41))).all()
    assert (pre["size_factor"] == 1.0).all()
    dec = df[df.phase == "decode"]
    assert (dec["kept"] == 5).all() and (dec["visible"] == 41).all()
    s = summarize(df, "decode")
    assert 5 / 41 <= s["kept_v_rows"] <= 2 * 5 / 41  # union over 2 query heads per KV head
    assert int(met.popularity[0].sum()) == int(pre[pre.layer == 0]["kept"].sum())


def test_wrong_model_thresholds_and_unprepared_model_are_refused(tiny_lm):
    th = constant_thresholds(tiny_lm, 0.1)
    other = wrap_model(tiny_model("llama", seed=7), name="another-tiny")
    with pytest.raises(ThresholdsError, match="tiny-llama.*another-tiny"):
        with sparse_run(SparseConfig(k=KSchedule(4)), th, model=other.model):
            pass
    raw = tiny_model("llama")
    with pytest.raises(ConfigError, match="prepare_model"):
        with sparse_run(SparseConfig(k=KSchedule(4)), th, model=raw):
            pass
    with pytest.raises(ConfigError, match="names layer"):
        with sparse_run(SparseConfig(k=KSchedule(4, {7: 64})), th, model=tiny_lm.model):
            pass
    with pytest.raises(ThresholdsError, match="needs thresholds"):
        with sparse_run(SparseConfig(k=KSchedule(4)), None):
            pass


@pytest.mark.slow
def test_smollm2_theta_minus_inf_matches_sdpa_logits_and_greedy_tokens(smollm2):
    from transformers import AutoModelForCausalLM

    from topθ_core.models import resolve_model_path

    path, _ = resolve_model_path("smollm2")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = smollm2.tokenizer("Sparse attention keeps what matters. " * 12, return_tensors="pt").input_ids
    th = constant_thresholds(smollm2, float("-inf"))
    cfg = SparseConfig(sdc="none", vmc=False, k=KSchedule(16))
    with torch.no_grad():
        want = ref(ids).logits
        with sparse_run(cfg, th, model=smollm2.model):
            got = smollm2.model(ids).logits
            gen = smollm2.model.generate(ids[:, :30], max_new_tokens=12, do_sample=False)
        gen_ref = ref.generate(ids[:, :30], max_new_tokens=12, do_sample=False)
    print("max |Δlogit|", (got - want).abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert torch.equal(gen, gen_ref)


def test_metrics_on_causal_key_prefix_chunks_equal_full_width_chunks():
    """SparsityMetrics accepts key-prefix chunks (causal rows skip the masked triangle); every
    count and the V-row popularity must equal those from full-width rows."""
    import pandas as pd

    from topθ_core.attention import topθ_attention_ref

    torch.manual_seed(4)
    B, Hq, Hkv, S, d = 2, 4, 2, 290, 8
    q, k, v = torch.randn(B, Hq, S, d), torch.randn(B, Hkv, S, d), torch.randn(B, Hkv, S, d)
    theta = torch.randn(B, Hq, S) * 0.3 + 1.0
    cfg = SparseConfig(k=KSchedule(8))
    prefix, full = SparsityMetrics(track_popularity=True), SparsityMetrics(track_popularity=True)
    assert prefix.accepts_key_prefix
    widths_p, widths_f = [], []

    class Prefix:
        accepts_key_prefix = True

        def __call__(self, block):
            widths_p.append(block.logits.shape[-1])
            prefix(0, block)

    def full_width(block):  # no accepts_key_prefix: full-width chunks
        widths_f.append(block.logits.shape[-1])
        full(0, block)

    out_p = topθ_attention_ref(q, k, v, config=cfg, k_keep=8, theta=theta, observer=Prefix())
    out_f = topθ_attention_ref(q, k, v, config=cfg, k_keep=8, theta=theta, observer=full_width,
                               block_elements=B * Hq * S * 100)  # 100 rows per chunk: several chunks
    torch.testing.assert_close(out_p, out_f)
    assert set(widths_f) == {S} and len(widths_f) > 1 and min(widths_p) < S and max(widths_p) == S
    pd.testing.assert_frame_equal(prefix.to_frame(), full.to_frame())
    torch.testing.assert_close(prefix.popularity[0], full.popularity[0])


# ---- generation (topθ_core.generation) and the static-cache decode step (topθ_core.graph_decode) ----

def test_compare_generate_cpu_streams_and_no_cache_deprecation(tiny_lm):
    """On CPU compare_generate decodes eagerly (no CUDA graphs): the dense stream's tokens are the
    model's own greedy tokens, the sparse stream's those of the sparse model, and no call passes the
    cache under a keyword the model's forward deprecates."""
    import warnings

    from topθ_core.generation import compare_generate
    from topθ_core.models import cache_kwarg

    th = constant_thresholds(tiny_lm, 0.05, sdc=0.3)
    cfg = SparseConfig(k=KSchedule(4))
    prompt = "The quick brown fox"
    model = tiny_lm.model
    ids = tiny_lm.tokenizer(prompt, return_tensors="pt").input_ids
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps = list(compare_generate(tiny_lm, prompt, cfg, th, max_new_tokens=6, stop_at_eos=False))
    assert not [w for w in caught if "past_key_values" in str(w.message) or "`cache`" in str(w.message)]
    assert len(steps) == 6 and steps[-1].dense_tok_s > 0 and steps[-1].sparse_tok_s > 0
    with torch.no_grad():
        want_dense = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
        with sparse_run(cfg, th, model=model):
            want_sparse = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    assert [s.dense_token for s in steps] == want_dense.tolist()
    assert [s.sparse_token for s in steps] == want_sparse.tolist()
    assert all(0 < s.kept_v_rows <= 1 for s in steps[1:])  # from the sparse stream's decode metrics
    assert cache_kwarg(model) in ("cache", "past_key_values")


def test_compare_generate_refuses_cuda_graphs_without_cuda(tiny_lm):
    from topθ_core.generation import generate_pair

    th = constant_thresholds(tiny_lm, 0.05)
    with pytest.raises(ValueError, match="CUDA"):
        generate_pair(tiny_lm, "The quick brown fox", SparseConfig(k=KSchedule(4)), th, max_new_tokens=2,
                      cuda_graphs=True)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "top-theta"])
def test_static_cache_decode_equals_dynamic_cache(tiny_lm, sparse):
    """GraphDecoder's static cache (preallocated buffers, a (B, 1, 1, max_len) prefix mask, the write
    position on the device) gives the logits and greedy tokens of the model's dynamic cache, for a
    batch of two sequences; eager here (CPU), the same steps a CUDA graph replays."""
    from topθ_core.graph_decode import GraphDecoder
    from topθ_core.models import cache_kwarg, output_cache

    model = tiny_lm.model
    th = constant_thresholds(tiny_lm, 0.05, sdc=0.3)
    cfg = SparseConfig(k=KSchedule(4))
    run = (lambda: sparse_run(cfg, th, model=model)) if sparse else None
    ids = torch.randint(2, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    kw = cache_kwarg(model)
    with torch.no_grad():
        ctx = run() if run else contextlib.nullcontext()
        with ctx:
            out = model(input_ids=ids, use_cache=True)
            cache, tok = output_cache(out), out.logits[:, -1:].argmax(-1)
            want = [out.logits[:, -1]]
            for _ in range(5):
                out = model(input_ids=tok, use_cache=True, **{kw: cache})
                cache, tok = output_cache(out), out.logits[:, -1:].argmax(-1)
                want.append(out.logits[:, -1])
        dec = GraphDecoder(model, run, max_len=12 + 6, cuda_graph=True)  # CPU: eager on the static cache
        got = [dec.prefill(ids)]
        for _ in range(5):
            got.append(dec.step().clone())
        with pytest.raises(RuntimeError, match="full"):
            dec.step()
            dec.step()
    assert not dec.graphed and dec.length == 18
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_graph_decode_refuses_sliding_windows():
    from topθ_core.generation import _use_graphs
    from topθ_core.graph_decode import GraphDecoder, graph_decode_supported

    model = tiny_model("gemma2")
    assert not graph_decode_supported(model) and graph_decode_supported(tiny_model("llama"))
    with pytest.raises(ValueError, match="sliding"):
        GraphDecoder(model, None, max_len=16)
    assert not _use_graphs(tiny_model("llama"), SparseConfig(), False)
