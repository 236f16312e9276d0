"""What every evaluation suite shares: machine description, memory measurement, IR metrics, JSON output.

Memory: :func:`peak_rss_mb` is the process-lifetime peak (``getrusage``'s ``ru_maxrss``), which only
ever grows. To attribute a peak to one system inside a suite that runs several in one process, wrap
that system in :class:`RssPeak`: a background thread samples the process RSS (psutil) every 10 ms and
keeps the maximum. That figure is the process's peak *while the system ran*, so it includes whatever
was loaded before (interpreter, data, earlier systems still referenced); it is not the system's own
footprint. Suites report it as ``peak_rss_mb`` and say so in their config.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import platform
import random
import re
import resource
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DataDirError",
    "REPO_ROOT",
    "RssPeak",
    "SuiteError",
    "check_opts",
    "get_opt",
    "default_data_dir",
    "ir_metrics",
    "load_curve",
    "machine_info",
    "passage_tokens",
    "with_passage_tokens",
    "peak_rss_mb",
    "require_data",
    "write_json",
]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
# ``--quick`` runs check a suite's mechanics, not its figures: passages are cut to this many tokens, so a
# list of 20 NQ passages makes a prompt of about 1,000 tokens instead of 3,000.
QUICK_PASSAGE_TOKENS = 32


class DataDirError(FileNotFoundError):
    """The evaluation data folder, or a dataset inside it, is missing."""


class SuiteError(ValueError):
    """A suite was given an option it does not know or a value it cannot use."""


def get_opt(opts: Mapping[str, str], key: str, default: Any) -> Any:
    """Read ``--opt key=value`` as the type of ``default`` (bool, int, float, str or a tuple of floats)."""
    if key not in opts:
        return default
    raw = opts[key]
    try:
        if isinstance(default, bool):
            if raw.lower() not in {"1", "0", "true", "false", "yes", "no"}:
                raise ValueError(raw)
            return raw.lower() in {"1", "true", "yes"}
        if isinstance(default, tuple):
            return tuple(float(x) for x in raw.split(","))
        return type(default)(raw)
    except ValueError:
        raise SuiteError(
            f"--opt {key}={raw!r}: expected a {type(default).__name__} like {default!r}"
        ) from None


def get_start(opts: Mapping[str, str], n_questions: int) -> int:
    """``--opt start=S``: the first test question of a part of a run split over question ranges."""
    start = int(get_opt(opts, "start", 0))
    if not 0 <= start < n_questions:
        raise SuiteError(f"start={start} must be at least 0 and below questions={n_questions}")
    return start


def passage_tokens(opts: Mapping[str, str], quick: bool, full: int) -> int:
    """``--opt passage_max_tokens=N``, each passage's token budget: ``full``, or 32 under ``--quick``."""
    n = int(get_opt(opts, "passage_max_tokens", QUICK_PASSAGE_TOKENS if quick else full))
    if n < 1:
        raise SuiteError(f"passage_max_tokens={n} must be at least 1")
    return n


def with_passage_tokens(cfg: Any, opts: Mapping[str, str], quick: bool) -> Any:
    """``cfg`` (a :class:`rerank.config.PipelineConfig`) with its probe's ``passage_max_tokens`` set by
    :func:`passage_tokens`, so that the probe, the generator and the baselines all read the same text."""
    cap = passage_tokens(opts, quick, cfg.probe.passage_max_tokens)
    return cfg.model_copy(
        update={"probe": fixed_fusion(cfg.probe).model_copy(update={"passage_max_tokens": cap})}
    )


def fixed_fusion(probe: Any) -> Any:
    """``probe`` with the fixed fusion z(probe) + 1 x z(first stage) the probe suites (rerank, position,
    qa, heads) were defined with, where it fuses fitted weights; ``python -m eval fusion`` measures those."""
    if probe.fusion == "fitted" and probe.weights is None:
        return probe.model_copy(update={"fusion": "fixed", "first_stage_weight": 1.0, "cascade": False})
    return probe


def check_opts(opts: Mapping[str, str], known: Iterable[str]) -> None:
    """Raise :class:`SuiteError` for an ``--opt`` key the suite does not use, listing the valid keys."""
    known = sorted(known)
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise SuiteError(f"unknown --opt {', '.join(unknown)}; this suite knows: {', '.join(known)}")


def default_data_dir() -> Path:
    """``../shared/data`` relative to the repository root."""
    return REPO_ROOT.parent / "shared" / "data"


def require_data(data_dir: Path, dataset: str) -> Path:
    """Return ``data_dir / dataset``, or raise :class:`DataDirError` saying what is missing and what to do."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataDirError(
            f"data folder not found: {data_dir}. Pass --data-dir pointing at the shared data "
            f"(default {default_data_dir()}); it is read in place, never copied into the repository"
        )
    path = data_dir / dataset
    if not path.exists():
        have = ", ".join(sorted(p.name for p in data_dir.iterdir())) or "nothing"
        raise DataDirError(f"dataset {dataset!r} not found in {data_dir} (it holds: {have})")
    return path


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, memory, OS, Python and key library versions (no hostname).

    Library versions are read from package metadata, so torch is not imported here.
    """
    import psutil

    return {
        "cpu": _cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        # Thread settings change timings a lot on a small shared machine; record them with the results.
        "thread_env": {
            k: os.environ.get(k)
            for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")
            if k in os.environ
        },
        "versions": {
            name: _version(name)
            for name in (
                "torch",
                "transformers",
                "sentence-transformers",
                "faiss-cpu",
                "bm25s",
                "rank-bm25",
                "numpy",
                "ir-measures",
            )
        },
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process since it started, in MiB (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class RssPeak:
    """Context manager sampling this process's RSS in a thread; ``.mb`` is the peak seen inside.

    Example:
        >>> with RssPeak() as mem:
        ...     build_and_search()
        >>> mem.mb
    """

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while True:
            self.mb = max(self.mb, proc.memory_info().rss / 2**20)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> RssPeak:
        self._thread = threading.Thread(target=self._sample, name="rss-peak", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample_once()

    def _sample_once(self) -> None:
        import psutil

        self.mb = max(self.mb, psutil.Process().memory_info().rss / 2**20)


_MEASURES = {"ndcg": "nDCG", "recall": "R", "mrr": "RR", "map": "AP", "p": "P"}
_NAME_RE = re.compile(r"^(ndcg|recall|mrr|map|p)@(\d+)$")


def ir_metrics(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    measures: Iterable[str] = ("ndcg@10", "recall@100", "mrr@10"),
) -> dict[str, float]:
    """Mean IR metrics over the queries of ``run`` that have judgements, computed with ``ir_measures``.

    Args:
        qrels: ``{qid: {doc id: grade}}``.
        run: ``{qid: {doc id: score}}``; higher scores rank first. trec_eval breaks score ties by doc
            id, so pass rank-derived scores when the run's own tie order must be kept.
        measures: Names ``ndcg@k``, ``recall@k``, ``mrr@k``, ``map@k``, ``p@k``.

    Returns:
        ``{name: mean value}`` over the queries of ``run`` that have judgements (queries only in
        ``qrels`` are ignored: the caller chooses the query set); a query with an empty list counts 0.

    Raises:
        ValueError: An unknown measure name, or no judged query in ``run``.
    """
    import ir_measures

    measures = list(measures)
    parsed = {}
    for name in measures:
        m = _NAME_RE.match(name)
        if not m:
            raise ValueError(
                f"unknown measure {name!r}; use one of {', '.join(k + '@k' for k in _MEASURES)} "
                "(e.g. ndcg@10)"
            )
        parsed[name] = ir_measures.parse_measure(f"{_MEASURES[m.group(1)]}@{m.group(2)}")
    judged = [q for q in run if q in qrels]
    if not judged:
        raise ValueError("no query of the run has judgements in qrels; check that the query ids match")
    # Evaluate every judged query of the run; include empty runs so that they count as 0.
    per_query: dict[str, dict[str, float]] = {q: {} for q in judged}
    full_run = {q: dict(run[q]) or {"__none__": 0.0} for q in judged}
    sub_qrels = {q: dict(qrels[q]) for q in judged}
    for metric in ir_measures.iter_calc(list(parsed.values()), sub_qrels, full_run):
        per_query[metric.query_id][str(metric.measure)] = float(metric.value)
    n = len(judged)
    return {name: sum(per_query[q].get(str(m), 0.0) for q in judged) / n for name, m in parsed.items()}


#: The embedded model's raw-attention curves, one per dtype (see configs/fit-curve-raw.yaml).
RAW_CURVES = "smollm2-135m-raw.json,smollm2-135m-raw-fp32.json"


def load_curve(
    names: str | Iterable[str], model: Any, probe_cfg: Any, calibrator: str, *, model_only: bool = False
) -> Any:
    """The first of ``names`` (curve files, or one comma-separated string) fitted for this probe.

    ``calibrator`` (``curve`` or ``curve+content-free``) decides the score kind the curve must be
    fitted on; ``model_only`` matches the model, its weights and dtype only (for a caller that uses the
    curve as the model's slot profile, not to correct this probe's scores). Raises
    ``CurveMismatchError`` when none matches and ``FileNotFoundError`` for a name that is not found.
    """
    from calibration.curve import MATCH_KEYS
    from rerank.config import CalibrationConfig
    from rerank.engines import AttentionReranker
    from rerank.engines.attention import load_matching_curve

    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    base = "content-free" if calibrator == "curve+content-free" else "none"
    meta = AttentionReranker(model, probe_cfg, CalibrationConfig(name=base)).probe_meta()
    keys = ("model_id", "weights_hash", "dtype") if model_only else MATCH_KEYS
    return load_matching_curve(list(names), meta, keys)


def _json_safe(value: Any, where: str, bad: list[str]) -> Any:
    """``value`` with every NaN or infinite float replaced by None; their places are added to ``bad``."""
    if isinstance(value, float) and not math.isfinite(value):
        bad.append(where)
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v, f"{where}.{k}", bad) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, f"{where}[{i}]", bad) for i, v in enumerate(value)]
    return value


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, creating parent folders; returns the path.

    JSON has no NaN: a non-finite float is written as null, with a warning naming where it was, rather
    than as the ``NaN`` token that strict readers refuse (or by failing, which would lose the run).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bad: list[str] = []
    data = _json_safe(data, "", bad)
    if bad:
        logger.warning(
            "%s: not a finite number, written as null: %s", path, ", ".join(b.lstrip(".") for b in bad)
        )
    path.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n", encoding="utf-8")
    return path


def per_query_metric(
    qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]], measure: str = "ndcg@10"
) -> dict[str, float]:
    """``{qid: value}`` of one measure for every judged query of ``run`` (one ``ir_measures`` call)."""
    import ir_measures

    m = _NAME_RE.match(measure)
    if not m:
        raise ValueError(f"unknown measure {measure!r}")
    parsed = ir_measures.parse_measure(f"{_MEASURES[m.group(1)]}@{m.group(2)}")
    judged = [q for q in run if q in qrels]
    out = dict.fromkeys(judged, 0.0)
    full_run = {q: dict(run[q]) or {"__none__": 0.0} for q in judged}
    for r in ir_measures.iter_calc([parsed], {q: dict(qrels[q]) for q in judged}, full_run):
        out[r.query_id] = float(r.value)
    return out


def paired_bootstrap_ci(
    a: Mapping[str, float], b: Mapping[str, float], trials: int = 10000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of the per-query differences ``a - b`` and its 95% paired-bootstrap interval (queries
    resampled with replacement, ``trials`` times)."""
    import numpy as np

    d = np.array([a[q] - b[q] for q in a], dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(trials, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def quick_corpus(
    corpus: Sequence[Any],
    qids: Sequence[str],
    qrels: Mapping[str, Mapping[str, int]],
    distractors: int,
    seed: int,
) -> tuple[list[Any], str]:
    """A reduced corpus for smoke runs: every passage judged for ``qids`` plus ``distractors`` others.

    The others are drawn with ``seed`` from the unjudged passages. Returns the passages (corpus order)
    and a note saying its figures are not comparable with the full corpus's.
    """
    judged = {d for q in qids for d in qrels[q]}
    others = sorted(p.id for p in corpus if p.id not in judged)
    keep = judged | set(random.Random(seed).sample(others, min(distractors, len(others))))
    kept = [p for p in corpus if p.id in keep]
    note = (
        f"QUICK SUBSET: {len(kept)} abstracts = the {len(judged & keep)} judged for the {len(qids)} "
        f"queries + {distractors} random others (seed {seed}); not comparable with full-corpus figures"
    )
    return kept, note
