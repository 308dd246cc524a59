"""Scoring text under whatever attention is active: log-likelihoods of continuations, token NLLs.

These functions run the model once; whether that is dense or sparse is decided by the caller
(inside or outside :func:`~topθ_core.integration.sparse_run`), which is how one function serves
both arms of a paired evaluation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..models import base_model, cache_kwarg, lm_head, model_device, output_cache


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(begin, score_from, end)`` that score every token but the first exactly once.

    Window tokens are ``ids[begin:end]`` (at most ``max_length``); it scores the tokens at
    positions ``score_from … end-1``, each predicted from everything before it in the window.
    The first window scores positions ``1 … max_length-1``; each later one scores ``stride``
    new tokens with ``max_length − stride`` tokens of context (``stride ≤ max_length − 1``).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if not 1 <= stride <= max_length - 1:
        raise ValueError(f"stride must be in [1, max_length-1] = [1, {max_length - 1}], got {stride}")
    out = []
    pos = 1
    while pos < n_tokens:
        end = min(n_tokens, max_length if pos == 1 else pos + stride)
        begin = max(0, end - max_length)
        out.append((begin, pos, end))
        pos = end
    return out


def token_nll(model, ids: torch.Tensor, score_from: int) -> torch.Tensor:
    """NLL (nats, float64) of tokens ``ids[score_from:]`` given their prefix in ``ids`` (1-D).

    Only the needed positions go through the LM head (``logits_to_keep``).
    """
    n = ids.numel()
    keep = n - score_from + 1  # logits at positions score_from-1 … n-1; the last one is dropped
    out = model(input_ids=ids.view(1, -1).to(model_device(model)), use_cache=False, logits_to_keep=keep)
    logits = out.logits[0, :-1].float()  # (n - score_from, V)
    targets = ids[score_from:].to(logits.device)
    return F.cross_entropy(logits, targets, reduction="none").double().cpu()


@dataclass(frozen=True)
class Request:
    """One scored continuation: ``log p(continuation | prefix + context)``, token ids (1-D)."""

    context: torch.Tensor  # (C,) at least one token
    continuation: torch.Tensor  # (T,) at least one token


ENCODING = "lm-eval-0.4.13"  # the tokenization rules of harness_encode / encode_pair (part of dense cache keys)


def harness_encode(tokenizer, text: str, special_tokens: bool = True) -> list[int]:
    """lm-evaluation-harness (0.4.13) ``HFLM.tok_encode``: the tokenizer's default special tokens (a BOS
    where the tokenizer adds one), none when the text already starts with the BOS (else EOS) token's
    text; ``special_tokens=False`` adds none (text that follows a few-shot prefix)."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    starts = prefix is not None and text.startswith(tokenizer.decode([prefix]))
    return list(tokenizer(text, add_special_tokens=special_tokens and not starts).input_ids)


def encode_pair(tokenizer, context: str, continuation: str, *, special_tokens: bool = True
                ) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness ``_encode_pair``: trailing spaces of the context move to the
    continuation; ``context_enc = enc(context)``, ``continuation_enc = enc(context +
    continuation)[len(context_enc):]``, with :func:`harness_encode`'s special tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = harness_encode(tokenizer, context + continuation, special_tokens)
    ctx = harness_encode(tokenizer, context, special_tokens)
    return ctx, whole[len(ctx):]


def layout_mask(key_valid: torch.Tensor, q_start: int) -> torch.Tensor:
    """4-D bool mask (B, 1, Sq, Sk) for queries at key positions ``q_start …`` of a padded layout.

    A real query sees valid keys at or before it; a padding query (its own key invalid) sees
    only itself, so it has a well-defined output, counts as a one-element row in the metrics,
    and is never seen by a real query.
    """
    B, Sk = key_valid.shape
    Sq = Sk - q_start
    qpos = torch.arange(q_start, Sk, device=key_valid.device).view(1, Sq, 1)
    kpos = torch.arange(Sk, device=key_valid.device).view(1, 1, Sk)
    causal = kpos <= qpos  # (1, Sq, Sk)
    q_valid = key_valid[:, q_start:].unsqueeze(-1)  # (B, Sq, 1)
    mask = causal & key_valid.unsqueeze(1) & q_valid
    mask = mask | ((kpos == qpos) & ~q_valid)
    return mask.unsqueeze(1)


def expand_cache(cache, index: torch.Tensor):
    """A new cache whose batch rows are ``cache``'s rows ``index`` (a copy; ``cache`` is untouched)."""
    new = copy.deepcopy(cache)
    new.batch_select_indices(index)
    return new


def cache_prefix(model, prefix: torch.Tensor):
    """KV cache (batch 1) of a shared prefix (1-D ids) under whatever attention is active."""
    base = base_model(model)
    dev = model_device(model)
    out = base(input_ids=prefix.view(1, -1).to(dev), use_cache=True)
    return output_cache(out)


def score_requests(model, requests: Sequence[Request], *, prefix: torch.Tensor | None = None, prefix_cache=None,
                   groups: Sequence[int] | None = None, max_rows: int = 32, max_tokens: int = 16384,
                   call: Callable | None = None) -> list[tuple[float, bool]]:
    """Summed log-likelihood and greedy flag of each request, batched, context computed once.

    Requests with the same ``groups`` id must share their context (the choices of one item):
    their context runs once (stage 1, a right-padded batch of contexts), then all their
    continuations run against a copy of that cache (stage 2).  ``prefix`` (1-D ids) with its
    ``prefix_cache`` (batch 1) is shared by every request.  Padding never changes a row:
    positions are explicit and padding queries see only themselves (:func:`_layout_mask`).
    ``call(fn, seq_len, n_items)`` wraps each model call (dense or sparse and metrics).
    Returns ``(log p, greedy)`` per request, in input order.
    """
    if not requests:
        return []
    base, project = base_model(model), lm_head(model)
    dev = model_device(model)
    kw = cache_kwarg(base)
    call = call or (lambda fn, seq_len, n: fn())
    P = 0 if prefix is None else int(prefix.numel())
    if P and prefix_cache is None:
        raise ValueError("a prefix needs its prefix_cache")
    groups = list(range(len(requests))) if groups is None else list(groups)
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    for g, idx in by_group.items():
        c0 = requests[idx[0]].context
        if any(not torch.equal(requests[i].context, c0) for i in idx[1:]):
            raise ValueError(f"requests of group {g} do not share their context")
    for r in requests:
        if r.context.numel() < 1 or r.continuation.numel() < 1:
            raise ValueError("every request needs at least one context and one continuation token")
    order = sorted(by_group, key=lambda g: (requests[by_group[g][0]].context.numel(),
                                            max(requests[i].continuation.numel() for i in by_group[g])))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    batch: list[int] = []

    def flush(batch_groups: list[int]) -> None:
        ctxs = [requests[by_group[g][0]].context for g in batch_groups]
        rows = [i for g in batch_groups for i in by_group[g]]
        row_item = torch.tensor([bi for bi, g in enumerate(batch_groups) for _ in by_group[g]], device=dev)
        B, R = len(ctxs), len(rows)
        C = max(c.numel() for c in ctxs)
        T = max(requests[i].continuation.numel() for i in rows)
        # stage 1: contexts, right-padded, after the shared prefix
        ctx_ids = torch.zeros(B, C, dtype=torch.long)
        ctx_valid = torch.zeros(B, C, dtype=torch.bool)
        for b, c in enumerate(ctxs):
            ctx_ids[b, : c.numel()] = c
            ctx_valid[b, : c.numel()] = True
        key_valid = torch.cat([torch.ones(B, P, dtype=torch.bool), ctx_valid], 1).to(dev)
        pos = (P + torch.arange(C)).expand(B, C).to(dev)
        cache = expand_cache(prefix_cache, torch.zeros(B, dtype=torch.long, device=dev)) if P else None

        def stage1():
            kwargs = {kw: cache} if cache is not None else {}
            return base(input_ids=ctx_ids.to(dev), attention_mask=layout_mask(key_valid, P), position_ids=pos,
                        use_cache=True, **kwargs)

        out1 = call(stage1, P + C, B)
        ctx_len = torch.tensor([c.numel() for c in ctxs], device=dev)
        h_last = out1.last_hidden_state[torch.arange(B, device=dev), ctx_len - 1]  # (B, d)
        # stage 2: every continuation of the batch against its item's context cache
        cont_ids = torch.zeros(R, T, dtype=torch.long)
        cont_valid = torch.zeros(R, T, dtype=torch.bool)
        for r, i in enumerate(rows):
            t = requests[i].continuation
            cont_ids[r, : t.numel()] = t
            cont_valid[r, : t.numel()] = True
        cont_valid = cont_valid.to(dev)
        cache2 = output_cache(out1)
        cache2.batch_select_indices(row_item)
        key_valid2 = torch.cat([key_valid[row_item], cont_valid], 1)
        pos2 = (P + ctx_len[row_item]).unsqueeze(1) + torch.arange(T, device=dev).unsqueeze(0)

        def stage2():
            return base(input_ids=cont_ids.to(dev), attention_mask=layout_mask(key_valid2, P + C), position_ids=pos2,
                        use_cache=True, **{kw: cache2})

        h2 = call(stage2, P + C + T, B).last_hidden_state  # (R, T, d)
        # hidden state predicting continuation token j: stage-1 last context state for j = 0,
        # stage-2 state j-1 otherwise
        hid = torch.cat([h_last[row_item].unsqueeze(1), h2[:, :-1]], 1)  # (R, T, d)
        logp = torch.log_softmax(project(hid[cont_valid]), -1)  # (n_valid, V)
        tgt = cont_ids.to(dev)[cont_valid]
        tok_lp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).double()
        greedy = logp.argmax(-1) == tgt
        # per row: Σ log p and "every token greedy", summed on the device, read back once per batch
        row_of = torch.arange(cont_valid.shape[0], device=dev).unsqueeze(1).expand_as(cont_valid)[cont_valid]
        lp_sum = torch.zeros(cont_valid.shape[0], dtype=torch.float64, device=dev).index_add_(0, row_of, tok_lp)
        misses = torch.zeros(cont_valid.shape[0], dtype=torch.long, device=dev).index_add_(0, row_of,
                                                                                           (~greedy).long())
        for r, (lp, miss) in enumerate(zip(*torch.stack([lp_sum, misses.double()]).tolist())):
            results[rows[r]] = (lp, miss == 0)

    n_rows = n_tok = 0
    for g in order:
        g_rows = len(by_group[g])
        g_tok = g_rows * (P + requests[by_group[g][0]].context.numel() +
                          max(requests[i].continuation.numel() for i in by_group[g]))
        if batch and (n_rows + g_rows > max_rows or n_tok + g_tok > max_tokens):
            flush(batch)
            batch, n_rows, n_tok = [], 0, 0
        batch.append(g)
        n_rows += g_rows
        n_tok += g_tok
    if batch:
        flush(batch)
    return results  # type: ignore[return-value]
