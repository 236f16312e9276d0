"""Building an :class:`~rerank.explain.record.Explanation` from one rerank call.

The attention reranker runs exactly as :meth:`Pipeline.rerank` runs it, inside
:func:`rerank.engines.attention.trace_probes`, which keeps each probed prompt's output instead of
dropping it once scored. Every figure of the page therefore comes from the prefills that produced the
ranking: the table's scores are the returned ``ScoredPassage`` fields, the token heatmap the query rows
those prefills computed (``ProbeOutput.query_tok``, computed by every probe anyway; keeping them costs
2 x layers x prompt tokens floats per prompt, linear in tokens), the layer chart and the bias strip
the per-passage arrays the calibrator scored.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rerank.explain.record import (
    BiasPanel,
    Counterfactual,
    Explanation,
    OrderReading,
    PassageView,
    TokenView,
)

logger = logging.getLogger(__name__)

# Token values are rounded to this many significant digits: enough for shading, and a 100-passage page
# stays small.
_TOKEN_DIGITS = 4
# The cut-away text shown (and counted) after a truncated passage's tokens.
_MAX_DROPPED_CHARS = 20_000


def _sig(x: float, digits: int = _TOKEN_DIGITS) -> float:
    return float(f"{x:.{digits}g}")


def _layer_rows(layers: Sequence[int], band: tuple[int, int] | None) -> list[int]:
    if band is None:
        return list(range(len(layers)))
    return [i for i, layer in enumerate(layers) if band[0] <= layer <= band[1]]


def _normalised(scores: np.ndarray, mode: str) -> np.ndarray:
    # The same per-list normalisation the curve applies before subtracting or dividing by its bias
    # (calibration.curve): centred for the additive modes, divided by the mean for the multiplicative.
    if mode == "multiplicative":
        m = scores.mean()
        return scores / m if m > 0 else scores
    return scores - scores.mean()


def _token_texts(tokenizer: Any, prompt: Any) -> list[str]:
    """The text of every prompt token: from its start to the next token's start, so that the pieces
    of a block join to its exact text (byte-level tokens that split one character get an empty piece)."""
    enc = tokenizer(prompt.text, add_special_tokens=False, return_offsets_mapping=True)
    if tuple(enc["input_ids"]) != tuple(prompt.input_ids):
        raise RuntimeError("re-tokenising the probed prompt gave other tokens; cannot place the heatmap")
    offsets = enc["offset_mapping"]
    starts = [a for a, _ in offsets]
    out = []
    for i, (a, b) in enumerate(offsets):
        nxt = starts[i + 1] if i + 1 < len(starts) else b
        out.append(prompt.text[a : max(nxt, a)])
    return out


def _common_suffix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(reversed(a), reversed(b), strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclasses.dataclass
class _Read:
    """One prompt's reading of one passage."""

    order: str
    slot: int
    raw: float
    uncorrected: float
    calibrated: float
    na: float | None
    ids: tuple[int, ...]
    texts: list[str]
    tok_raw: np.ndarray
    tok_na: np.ndarray | None
    layer_q: np.ndarray
    layer_na: np.ndarray | None
    truncated: bool


def _layer_values(kind: str, q: np.ndarray, na: np.ndarray | None, length: int, agg: str) -> np.ndarray:
    """What each layer alone would score, in the score's own kind."""
    if kind in ("ratio", "logratio") and na is not None:
        return np.log(q + 1e-9) - np.log(na + 1e-9)
    v = q - na if kind == "nacal" and na is not None else q
    return v / max(length, 1) if agg == "mean" else v


def build_explanation(
    pipeline: Any,
    query: Any,
    passages: Sequence[Any],
    *,
    counterfactual: bool = False,
    top_tokens: int = 8,
) -> Explanation:
    """Rerank ``passages`` for ``query`` with ``pipeline``'s attention reranker and explain the result.

    Args:
        pipeline: A :class:`rerank.pipeline.Pipeline` whose engine is ``attention``.
        query: Query text or :class:`rerank.records.Query`.
        passages: Candidates, best first (str, Passage, Hit or ScoredPassage, as for ``rerank``).
        counterfactual: Also move the top passage to the other end of its prompt and probe that prompt
            (one extra prefill).
        top_tokens: How many top tokens each passage lists.

    Returns:
        The explanation; its per-passage scores, ranks and slots are the reranker's own output with
        the cascade off (the page shows every window the probe reads, so it reads them all).

    Raises:
        ValueError: The engine is not the attention probe, or there is nothing to rerank.
    """
    from rerank.engines.attention import AttentionReranker, trace_probes
    from rerank.engines.base import as_query, probe_windows, prompt_slots, split_candidates, window_orders
    from rerank.probe.calibrators import ScoreSettings
    from rerank.probe.scoring import passage_scores

    rr = pipeline.reranker
    if not isinstance(rr, AttentionReranker):
        raise ValueError(
            f"explain reads the attention probe; this config's engine is '{pipeline.config.probe.engine}' "
            "(set probe.engine: attention)"
        )
    q = as_query(query)
    ps, first = split_candidates(passages)
    if not ps:
        raise ValueError("nothing to explain: no passages given")

    t0 = time.perf_counter()
    cascade = rr.cfg.cascade
    try:
        # The page shows every window the probe read: with the cascade it would read only the best one.
        rr.cfg = rr.cfg.model_copy(update={"cascade": False})
        with trace_probes() as traces:
            ranked = rr.rerank(q, passages)
    finally:
        rr.cfg = rr.cfg.model_copy(update={"cascade": cascade})
    if not traces:
        raise ValueError(
            "nothing to explain: the probe's fusion weight is 0 for this model, so no prompt was read "
            f"(weights: {ranked.info.get('weights')})"
        )
    t_rerank = time.perf_counter() - t0
    t1 = time.perf_counter()

    cfg = rr.cfg
    settings = ScoreSettings.of(cfg)
    score_kind = settings.kind(rr.calibrator.score_kind)
    kw = settings.kwargs()
    curve = rr.curve if rr.calibrator.uses_curve else None
    mode = curve.mode if curve is not None else "none"
    tok = rr.model.tokenizer
    windows = probe_windows(len(ps), cfg)

    reads: dict[int, list[_Read]] = {i: [] for i in range(len(ps))}
    window_of: dict[int, int] = {}
    prompts_facts: list[dict[str, Any]] = []
    strip: dict[str, list[dict[str, Any]]] = {}
    row_bytes = 0
    t = 0
    for w, win in enumerate(windows):
        idx = list(win)
        for k, order in enumerate(window_orders(len(idx), cfg)):
            tr = traces[t] if t < len(traces) else None
            cand_of_slot = [idx[c] for c in prompt_slots(len(idx), order)]
            if tr is None or [p.id for p in tr.passages] != [ps[c].id for c in cand_of_slot]:
                if k > 0 and (
                    (cfg.orders_early_exit and order.startswith("shuffle")) or cfg.second_order == "adaptive"
                ):
                    break  # the reranker stopped reading this window's orders early
                raise RuntimeError("the probed prompts do not match the reranker's windows; cannot explain")
            t += 1
            out, stats = tr.output, tr.stats
            prompt = out.prompt
            row_bytes += out.query_tok.nbytes + (out.na_tok.nbytes if out.na_tok is not None else 0)
            prompts_facts.append(
                {
                    "window": w,
                    "order": order,
                    "tokens": prompt.num_tokens,
                    "prefix_tokens": prompt.prefix_len,
                    "query_tokens": prompt.query_len,
                    "passages": len(idx),
                    "truncated": int(sum(prompt.truncated)),
                }
            )
            unc = passage_scores(stats, kind=score_kind, **kw)
            na_scores = None
            if stats.na is not None:
                swapped = dataclasses.replace(stats, query=stats.na, query_tok=stats.na_tok)
                na_scores = passage_scores(swapped, kind="raw", **kw)
            li = _layer_rows(out.layers, settings.layers)
            tok_q = out.query_tok[li].sum(axis=0)
            tok_na = out.na_tok[li].sum(axis=0) if out.na_tok is not None else None
            texts = _token_texts(tok, prompt)
            hs = slice(None) if settings.heads is None else list(settings.heads)
            lq = stats.query[:, hs].sum(axis=1)  # (layers, passages)
            lna = stats.na[:, hs].sum(axis=1) if stats.na is not None else None
            norm = _normalised(np.asarray(unc, dtype=np.float64), mode)
            for slot, c in enumerate(cand_of_slot):
                window_of[c] = w
                s, e = out.spans[slot]
                reads[c].append(
                    _Read(
                        order=order,
                        slot=slot,
                        raw=float(tr.raw[slot]),
                        uncorrected=float(unc[slot]),
                        calibrated=float(tr.calibrated[slot]),
                        na=None if na_scores is None else float(na_scores[slot]),
                        ids=tuple(prompt.input_ids[s:e]),
                        texts=texts[s:e],
                        tok_raw=tok_q[s:e],
                        tok_na=None if tok_na is None else tok_na[s:e],
                        layer_q=lq[:, slot],
                        layer_na=None if lna is None else lna[:, slot],
                        truncated=bool(prompt.truncated[slot]),
                    )
                )
                strip.setdefault(order, []).append(
                    {
                        "cand": c,
                        "window": w,
                        "slot": slot,
                        "n": len(idx),
                        "uncorrected": float(norm[slot]),
                        "calibrated": float(tr.calibrated[slot]),
                    }
                )
    if t < len(traces):
        raise RuntimeError("the reranker probed more prompts than its windows explain")

    # Which passages the configured policy hands to the generator, and in what order. An iterative
    # order would probe again; only its prune step is shown then.
    context = _context(pipeline, ranked)
    ctx_pos = {sp.passage.id: i for i, sp in enumerate(context)}
    cand_index = {p.id: i for i, p in enumerate(ps)}
    layers = tuple(int(x) for x in traces[0].output.layers)

    views = []
    for item in ranked.items:
        c = cand_index[item.passage.id]
        rs = reads[c]
        views.append(
            PassageView(
                id=item.passage.id,
                title=item.passage.title,
                text=item.passage.text,
                rank=item.rank,
                first_stage_rank=c + 1,
                first_stage_score=item.first_stage_score,
                raw_score=item.raw_score,
                calibrated_score=item.calibrated_score,
                score=item.score,
                prompt_position=item.prompt_position,
                na_score=None if rs[0].na is None else float(np.mean([r.na for r in rs])),
                window=window_of[c],
                readings=tuple(
                    OrderReading(
                        order=r.order,
                        slot=r.slot,
                        raw=r.raw,
                        uncorrected=r.uncorrected,
                        calibrated=r.calibrated,
                    )
                    for r in rs
                ),
                kept=item.passage.id in ctx_pos,
                context_position=ctx_pos.get(item.passage.id),
                rank_change=c + 1 - item.rank,
                layer_scores=_layer_scores(rs, score_kind, settings.aggregation),
                layer_share=_layer_share(rs),
                tokens=_tokens(tok, item.passage, rs, cfg.passage_max_tokens, rr.template, top_tokens),
            )
        )

    panels = []
    rank_of = {it.passage.id: it.rank for it in ranked.items}
    length = max(len(w) for w in windows)
    for order, pts in strip.items():
        panel: dict[str, Any] = {"order": order, "length": length, "mode": mode}
        if curve is not None:
            panel["mean"] = tuple(_sig(v, 6) for v in curve.bias(length))
            if mode == "zscore" and length in curve.sd:
                panel["sd"] = tuple(_sig(v, 6) for v in curve.sd[length])
            panel["offset"] = tuple(_sig(v, 6) for v in curve.offsets(length))
        panel["points"] = tuple(
            {
                "id": ps[p["cand"]].id,
                "rank": rank_of[ps[p["cand"]].id],
                "window": p["window"],
                "slot": p["slot"],
                "n": p["n"],
                "uncorrected": p["uncorrected"],
                "calibrated": p["calibrated"],
            }
            for p in pts
        )
        panels.append(BiasPanel(**panel))

    t_build = time.perf_counter() - t1
    cf = None
    t_cf = 0.0
    if counterfactual:
        t2 = time.perf_counter()
        cf = _counterfactual(rr, q.text, ps, windows, ranked, reads, cand_index)
        t_cf = time.perf_counter() - t2

    facts = _facts(pipeline, rr, ranked, prompts_facts, score_kind, curve, row_bytes, len(ps))
    facts["timings"] = {
        "rerank_seconds": round(t_rerank, 4),
        "explain_seconds": round(t_build, 4),
        "counterfactual_seconds": round(t_cf, 4),
        "total_seconds": round(t_rerank + t_build + t_cf, 4),
    }
    return Explanation(
        query=q.text,
        qid=q.qid,
        passages=tuple(views),
        layers=layers,
        layer_kind=_layer_kind(score_kind),
        bias=tuple(panels),
        counterfactual=cf,
        facts=facts,
    )


def _layer_kind(kind: str) -> str:
    return {
        "ratio": "log(query / N/A) attention of that layer alone",
        "logratio": "log(query / N/A) attention of that layer alone",
        "nacal": "query minus N/A attention in that layer",
        "raw": "query attention in that layer",
    }.get(kind, kind)


def _layer_scores(rs: Sequence[_Read], kind: str, agg: str) -> tuple[float, ...]:
    length = len(rs[0].ids)
    vals = np.mean([_layer_values(kind, r.layer_q, r.layer_na, length, agg) for r in rs], axis=0)
    return tuple(_sig(float(v), 6) for v in vals)


def _layer_share(rs: Sequence[_Read]) -> tuple[float, ...]:
    # For the pooled ratio score, log(sum_l q_l / sum_l na_l), layer l's share of the ratio is exactly
    # q_l / sum q: the share of the passage's query attention that layer holds.
    shares = [r.layer_q / max(float(r.layer_q.sum()), 1e-12) for r in rs]
    return tuple(_sig(float(v), 4) for v in np.mean(shares, axis=0))


def _tokens(
    tokenizer: Any,
    passage: Any,
    rs: Sequence[_Read],
    max_tokens: int,
    template: Any,
    top_n: int,
) -> TokenView:
    """One heatmap row: the first prompt's tokens, each value averaged over the prompts that read it.

    The block starts with its ``[n]`` marker, which differs between orders; the body's tokens are
    aligned from the end of the block.
    """
    base = rs[0]
    raw = base.tok_raw.astype(np.float64).copy()
    na = None if base.tok_na is None else base.tok_na.astype(np.float64).copy()
    counts = np.ones(len(raw))
    for r in rs[1:]:
        k = _common_suffix(base.ids, r.ids)
        if k == 0:
            continue
        raw[-k:] += r.tok_raw[-k:]
        if na is not None and r.tok_na is not None:
            na[-k:] += r.tok_na[-k:]
        counts[-k:] += 1
    raw /= counts
    corrected = raw - na / counts if na is not None else raw
    top = [int(i) for i in np.argsort(-corrected, kind="stable")[:top_n]]
    dropped_tokens, dropped_text = 0, ""
    if base.truncated:
        from rerank.probe.prompt import truncate_text

        kept, _ = truncate_text(tokenizer, passage.text, max_tokens)
        # A huge passage must not make a huge page or a long tokenisation: count and show a bounded tail.
        rest = passage.text[len(kept) : len(kept) + _MAX_DROPPED_CHARS]
        dropped_tokens = len(tokenizer(rest, add_special_tokens=False)["input_ids"])
        dropped_text = rest if len(passage.text) - len(kept) <= _MAX_DROPPED_CHARS else rest + " …"
    return TokenView(
        tokens=tuple(base.texts),
        raw=tuple(_sig(float(v)) for v in raw),
        corrected=tuple(_sig(float(v)) for v in corrected),
        top=tuple(top),
        truncated=base.truncated,
        dropped_tokens=dropped_tokens,
        dropped_text=dropped_text,
    )


def _context(pipeline: Any, ranked: Any) -> list[Any]:
    pol = pipeline.config.policy
    if pol.order == "iterative":
        from rerank.policies import PRUNE_POLICIES

        return list(PRUNE_POLICIES.get(pol.prune)(list(ranked.items), pol, token_counts=None))
    return list(pipeline.select(ranked))


def _counterfactual(
    rr: Any,
    query: str,
    ps: Sequence[Any],
    windows: Sequence[range],
    ranked: Any,
    reads: Mapping[int, list[_Read]],
    cand_index: Mapping[str, int],
) -> Counterfactual | None:
    """Probe the top passage's window once more with that passage moved to the other end."""
    from rerank.engines.attention import trace_probes
    from rerank.engines.base import prompt_slots

    top = ranked.items[0].passage
    c = cand_index[top.id]
    win = next(list(w) for w in windows if c in w)
    if len(win) < 2:
        return None
    before = reads[c][0]
    order = before.order
    slots = [win[i] for i in prompt_slots(len(win), order)]
    moved = [x for x in slots if x != c]
    new_slot = 0 if before.slot >= len(win) / 2 else len(win) - 1
    moved.insert(new_slot, c)
    with trace_probes() as traces:
        rr.score_in_prompt_order(query, [ps[x] for x in moved])
    after = traces[-1]
    orig_cal = np.array([reads[x][0].calibrated for x in slots])

    def rank_in(cal: np.ndarray, slot: int) -> int:
        return int((cal > cal[slot]).sum()) + 1

    return Counterfactual(
        id=top.id,
        order=order,
        slot_before=before.slot,
        slot_after=new_slot,
        calibrated_before=before.calibrated,
        calibrated_after=float(after.calibrated[new_slot]),
        raw_before=before.raw,
        raw_after=float(after.raw[new_slot]),
        window_rank_before=rank_in(orig_cal, before.slot),
        window_rank_after=rank_in(np.asarray(after.calibrated), new_slot),
    )


def _facts(
    pipeline: Any,
    rr: Any,
    ranked: Any,
    prompts: list[dict[str, Any]],
    score_kind: str,
    curve: Any,
    row_bytes: int,
    n: int,
) -> dict[str, Any]:
    m = rr.model
    curve_facts = None
    if curve is not None:
        fit = curve.meta.get("fit", {}) if isinstance(curve.meta, dict) else {}
        curve_facts = {
            "mode": curve.mode,
            "lengths": list(curve.lengths),
            "offsets": bool(curve.offset),
            "fitted_on": fit.get("data"),
            "dtype": curve.meta.get("dtype"),
        }
    return {
        "model": m.model_id,
        "dtype": m.dtype,
        "device": str(m.device),
        "num_layers": m.num_layers,
        "num_heads": m.num_heads,
        "probe_layers": [rr.engine.layers[0], rr.engine.layers[-1]],
        "score_kind": score_kind,
        "aggregation": rr.cfg.aggregation,
        "calibrator": rr.cal_cfg.name,
        "curve": curve_facts,
        "prompt_order": rr.cfg.prompt_order,
        "first_stage": ranked.info.get("first_stage"),
        "first_stage_weight": rr.cfg.first_stage_weight,
        "weights": ranked.info.get("weights", {}),
        "signals": ranked.info.get("signals", {}),
        "passages": n,
        "windows": ranked.info.get("windows"),
        "prompts": prompts,
        "prompt_tokens": int(sum(p["tokens"] for p in prompts)),
        "template": dataclasses.asdict(rr.template),
        "token_rows_bytes": int(row_bytes),
        "config": pipeline.config.model_dump(mode="json"),
    }
