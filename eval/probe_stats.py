"""Run the probe once per prompt and keep its per-passage attention arrays on disk.

Every layer is read and the content-free pass is always run, so that any layer range, head subset,
aggregation and calibrator can be scored afterwards from the same forward passes. Runs are cached under
``results/cache`` keyed by model and prompt, so re-running a suite does not repeat the forward passes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rerank.model import LoadedModel
from rerank.prompt import NA_QUERY, PromptTemplate, build_prompt
from rerank.records import Passage
from rerank.scoring import PassageStats


@dataclass(frozen=True)
class ProbeJob:
    """One prompt to probe: ``passages`` in prompt order."""

    key: str
    query: str
    passages: tuple[Passage, ...]


def _digest(model: LoadedModel, job: ProbeJob, max_tokens: int, template: PromptTemplate, last: int) -> str:
    h = hashlib.sha256()
    h.update(f"{model.weights_hash}|{model.dtype}|{max_tokens}|{template!r}|{job.query}".encode())
    if last != model.num_layers - 1:
        h.update(f"|last{last}".encode())
    for p in job.passages:
        h.update(f"|{p.id}|{p.title}|{p.text}".encode())
    return h.hexdigest()[:20]


def save_npz(path: Path, **arrays: object) -> None:
    """``np.savez_compressed`` under another name, then renamed: a process killed mid-write leaves no
    truncated file, and parallel writers of the same path never interleave."""
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    os.replace(tmp, path)


def collect(
    model: LoadedModel,
    jobs: Sequence[ProbeJob],
    *,
    cache_dir: Path,
    max_passage_tokens: int = 300,
    template: PromptTemplate | None = None,
    keep_tokens: bool = False,
    last_layer: int | None = None,
    reuse_prefix: bool = False,
    desc: str = "probe",
) -> tuple[dict[str, PassageStats], dict[str, float]]:
    """Probe every job (layers 0..``last_layer``, default all, with the N/A pass).

    Returns stats and seconds per job key; cached results report the seconds measured when they were
    computed. ``reuse_prefix`` keeps the KV cache of the previous prompt's common token prefix (see
    :class:`rerank.probe.AttentionProbe`): order ``jobs`` so that consecutive prompts share long prefixes.
    """
    from tqdm.auto import tqdm

    from rerank.probe import AttentionProbe, stats_of

    template = template or PromptTemplate()
    last = model.num_layers - 1 if last_layer is None else last_layer
    probe = AttentionProbe(model, layers=(0, last), early_exit=True, reuse_prefix=reuse_prefix)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stats: dict[str, PassageStats] = {}
    seconds: dict[str, float] = {}
    for job in tqdm(jobs, desc=desc, unit="prompt"):
        f = cache_dir / f"{_digest(model, job, max_passage_tokens, template, last)}.npz"
        if f.is_file():
            z = np.load(f)
            meta = json.loads(str(z["meta"]))
            stats[job.key] = PassageStats(
                layers=tuple(meta["layers"]),
                query=z["query"],
                na=z["na"],
                lengths=z["lengths"],
                query_tok=z["query_tok"] if "query_tok" in z else None,
                na_tok=z["na_tok"] if "na_tok" in z else None,
                spans=tuple(tuple(s) for s in meta["spans"]) if "query_tok" in z else None,
            )
            seconds[job.key] = float(meta["seconds"])
            continue
        t0 = time.perf_counter()
        kw = {"max_passage_tokens": max_passage_tokens, "template": template}
        prompt = build_prompt(model.tokenizer, job.query, job.passages, **kw)
        na = build_prompt(model.tokenizer, NA_QUERY, job.passages, **kw)
        reused = probe.reused_tokens
        out = probe.run_prompt(prompt, na)
        dt = time.perf_counter() - t0
        reused = probe.reused_tokens - reused
        st = stats_of(out)
        arrays = {"query": st.query.astype(np.float32), "na": st.na.astype(np.float32), "lengths": st.lengths}
        if keep_tokens:
            arrays["query_tok"] = st.query_tok.astype(np.float32)
            arrays["na_tok"] = st.na_tok.astype(np.float32)
        meta = {
            "layers": list(st.layers),
            "spans": [list(s) for s in st.spans],
            "seconds": dt,
            "tokens": prompt.num_tokens,
            "reused_prefix_tokens": reused,
        }
        save_npz(f, meta=json.dumps(meta), **arrays)
        if not keep_tokens:
            st = PassageStats(st.layers, st.query, st.na, st.lengths)
        stats[job.key] = st
        seconds[job.key] = dt
    return stats, seconds
