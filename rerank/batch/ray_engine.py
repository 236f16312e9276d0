"""Reranking and passage encoding as Ray Data stages: one pipeline (or encoder) per actor.

:func:`rerank_dataset` maps a dataset of requests through :class:`QueryReranker`, a callable class that
builds the :class:`~rerank.pipeline.Pipeline` once per actor of an ``ActorPoolStrategy`` pool and asks
for a GPU per actor when the config runs the model on CUDA. A request that cannot be parsed or that the
model refuses becomes a row with an ``error`` instead of failing the job; a worker process that dies is
replaced by Ray and its batch is run again, so every input row gives exactly one output row.

:func:`encode_passages` does the same for the dense encoder of an index build (:class:`PassageEncoder`).

Nothing here imports Ray at import time: a missing ``ray`` is reported by :func:`require_ray` with the
extra to install.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RAY_INSTALL_HINT = "pip install 'attn-rerank[ray]'"

#: Columns of the rows :func:`rerank_dataset` returns.
OUTPUT_COLUMNS = ("line", "qid", "result", "error")

#: Object store of a local cluster started by :func:`init_ray`: small, since rows are requests and
#: result lines, not tensors; Ray's default (30% of RAM) would take memory the models need.
LOCAL_OBJECT_STORE_BYTES = 500 * 1024 * 1024


class RayMissingError(ImportError):
    """Ray (Ray Data) is not installed."""


def require_ray() -> Any:
    """Import and return ``ray`` (with ``ray.data``).

    Raises:
        RayMissingError: Ray is not installed; the message names the extra to install.
    """
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data ships in the ray[data] extra, not in bare ray
    except ImportError as exc:
        raise RayMissingError(
            f"the Ray engine needs Ray Data ({exc.msg if hasattr(exc, 'msg') else exc}); "
            f"install it with: {RAY_INSTALL_HINT}"
        ) from None
    return ray


def quiet_ray_data(show_progress: bool) -> None:
    """Keep Ray Data from drawing its own progress bars and execution banners.

    The caller draws one progress bar (or none); Ray's per-operator bars would redraw over it.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = show_progress
    ctx.enable_operator_progress_bars = show_progress
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    if not logger.isEnabledFor(logging.INFO):
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # Ray Data warns that its bars are off, which is the point here.
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def init_ray(address: str | None = None, *, num_cpus: int | None = None, verbose: bool = False) -> bool:
    """Connect to a Ray cluster, or start a small local one; reuse a connection that already exists.

    Args:
        address: ``auto`` (a running cluster on this machine), ``ray://host:port`` (Ray client) or a
            GCS address; None starts a local cluster in this process.
        num_cpus: CPUs of a local cluster (None: all of this machine's).
        verbose: Stream the workers' logs to this process (off by default: they interleave with the
            caller's output).

    Returns:
        Whether this call started the connection (then the caller shuts it down).
    """
    ray = require_ray()
    if ray.is_initialized():
        return False
    # Repeated worker log lines are collapsed; set before init, which reads it.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.WARNING,
    }
    if address is None:
        kwargs["object_store_memory"] = LOCAL_OBJECT_STORE_BYTES
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
    else:
        _check_reachable(address)
        kwargs["address"] = address
    ray.init(**kwargs)
    return True


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast when nothing listens at ``host:port``: ``ray.init`` would retry for minutes.

    Raises:
        ConnectionError: The address answers no TCP connection within ``timeout`` seconds.
    """
    import socket

    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return  # "auto" and other forms: left to Ray, which fails fast on them
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {address} ({exc.strerror or exc})") from None


def _wants_cuda(config: Any) -> bool:
    device = str(config.model.device)
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    # "auto" means CUDA when the workers have it: ask the cluster, not this (driver) machine.
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def _resolve_config(config: Any) -> Any:
    from rerank.config import PipelineConfig, load_config

    if isinstance(config, PipelineConfig):
        return config
    return load_config(config)


def worker_config(config: Any, threads: int | None) -> Any:
    """``config`` with ``model.threads`` set for one actor, unless the config already sets it."""
    if threads is None or config.model.threads is not None:
        return config
    return config.model_copy(update={"model": config.model.model_copy(update={"threads": threads})})


def _set_worker_env() -> None:
    # A worker on another node does not inherit the driver's environment: never reach for the hub,
    # and let idle OpenMP threads sleep (several actors share a machine's cores).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# --------------------------------------------------------------------------------------------------
# Reranking
# --------------------------------------------------------------------------------------------------


class QueryReranker:
    """A Ray Data callable class: builds the pipeline once per actor, then reranks batches of requests.

    A row is either a JSON request line (column ``raw`` as bytes, or ``text`` as read by
    ``ray.data.read_text``), in one of the forms ``attn-rerank run`` reads, or an already decoded request
    (columns ``query`` and ``candidates``, or ``qid`` and ``query`` with ``index_dir``). An optional
    ``line`` column is passed through (the CLI's line number; -1 otherwise).

    Output rows: ``line``, ``qid``, ``result`` (the JSON line ``attn-rerank run`` writes; empty on
    error) and ``error`` (empty when the row succeeded).

    Args:
        config: The pipeline config object.
        index_dir: Index for requests without candidates (must be readable on every worker).
        top_k: Keep the best ``top_k`` per query; None keeps all.
        max_line_bytes: Longest request line accepted.
    """

    def __init__(
        self,
        config: Any,
        index_dir: str | None = None,
        top_k: int | None = None,
        max_line_bytes: int = 1 << 20,
    ) -> None:
        _set_worker_env()
        from rerank.core.common import build_pipeline

        self.index = Path(index_dir) if index_dir else None
        self.max_line_bytes = max_line_bytes
        self.top_k = top_k
        self.config = config
        self.pipe = build_pipeline(config, self.index)  # a failure is reported by the driver (exit 2)

    def _retrieve(self, todo: list[Any]) -> tuple[dict[str, list[Any]], dict[str, str]]:
        """First-stage candidates of requests without candidates, as the local engine retrieves them."""
        from rerank.core.common import retrieve_for

        return retrieve_for(self.pipe, todo, self.config.retriever.top_k)

    def pid(self) -> int:
        """This actor's process id (tests kill it)."""
        return os.getpid()

    def _parse(self, row: dict[str, Any], line: int) -> Any:
        from rerank.core.inputs import parse_request, read_requests

        raw = row.get("raw", row.get("text"))
        has_index = self.index is not None
        if raw is not None:
            data = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)
            reqs = read_requests(
                io.BytesIO(data), [(line, 0)], has_index=has_index, max_line_bytes=self.max_line_bytes
            )
            return reqs[0]
        obj = {k: v for k, v in row.items() if k in ("qid", "query", "candidates") and v is not None}
        return parse_request(_drop_nulls(obj), line, has_index=has_index)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        from rerank.core.output import result_line
        from rerank.records import Query

        out: list[dict[str, Any]] = []
        reqs: list[tuple[int, Any]] = []
        for row in batch.to_pylist():
            line = int(row["line"]) if row.get("line") is not None else -1
            try:
                req = self._parse(row, line)
            except (ValueError, RuntimeError) as exc:  # LineError, or a record pydantic refuses
                out.append({"line": line, "qid": "", "result": "", "error": str(exc)})
            else:
                reqs.append((len(out), req))
                out.append({"line": line, "qid": req.qid, "result": "", "error": ""})
        retrieved, failed = self._retrieve([r for _, r in reqs if r.candidates is None])
        for i, req in reqs:
            if req.qid in failed:
                out[i]["error"] = failed[req.qid]
                continue
            cands = req.candidates if req.candidates is not None else retrieved[req.qid]
            try:
                ranked = self.pipe.rerank(Query(qid=req.qid, text=req.text), cands, top_k=self.top_k)
                out[i]["result"] = result_line(req.qid, req.text, ranked)
            except Exception as exc:  # one failing row must not end the job; worded as the local engine
                logger.info("rerank failed for qid %s", req.qid, exc_info=True)
                out[i]["error"] = f"rerank failed: {type(exc).__name__}: {exc}"
        return pa.Table.from_pylist(out, schema=_output_schema())


def _output_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [("line", pa.int64()), ("qid", pa.string()), ("result", pa.string()), ("error", pa.string())]
    )


def _drop_nulls(value: Any) -> Any:
    # Arrow gives every struct the union of the fields seen in the column, filled with None; a request
    # without e.g. a candidate "score" must parse as it would from its JSON line.
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _actor_resources(config: Any, num_gpus: float | None) -> dict[str, float]:
    gpus = num_gpus if num_gpus is not None else (1.0 if _wants_cuda(config) else 0.0)
    res: dict[str, float] = {"num_cpus": 1.0}
    if gpus:
        res["num_gpus"] = gpus
    return res


def rerank_dataset(
    ds: Any,
    config: Any = "default",
    *,
    workers: int = 1,
    batch_size: int = 4,
    index_dir: str | Path | None = None,
    top_k: int | None = None,
    threads: int | None = 1,
    num_gpus: float | None = None,
    max_line_bytes: int = 1 << 20,
) -> Any:
    """Rerank a Ray dataset of requests; one output row per input row.

    Args:
        ds: A ``ray.data.Dataset`` of requests (see :class:`QueryReranker` for the row forms).
        config: A :class:`~rerank.config.PipelineConfig`, a shipped config name or a YAML path.
        workers: Actors in the pool, each holding one pipeline.
        batch_size: Requests per ``map_batches`` call (a killed worker redoes at most one batch).
        index_dir: Index for requests without candidates; readable at this path on every worker.
        top_k: Keep the best ``top_k`` per query; None keeps all.
        threads: torch threads per actor when the config does not set ``model.threads``.
        num_gpus: GPUs per actor; None asks for one when the config's device is CUDA (or ``auto`` on a
            cluster with GPUs), none otherwise.
        max_line_bytes: Longest request line accepted.

    Returns:
        A lazy dataset with the columns ``line``, ``qid``, ``result`` (the JSON line
        ``attn-rerank run`` writes for the query) and ``error`` (empty unless the row failed).
    """
    ray = require_ray()
    if workers < 1 or batch_size < 1:
        raise ValueError(f"workers and batch_size must be >= 1, got {workers} and {batch_size}")
    cfg = worker_config(_resolve_config(config), threads)
    return ds.map_batches(
        QueryReranker,
        fn_constructor_kwargs={
            "config": cfg,
            "index_dir": str(index_dir) if index_dir is not None else None,
            "top_k": top_k,
            "max_line_bytes": max_line_bytes,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        # One batch in flight per actor: batches take seconds, and a batch queued behind a busy actor
        # would wait while another actor sits idle at the end of the job.
        # A killed worker is restarted and its batch retried, however often that happens: Ray Data's
        # defaults for actor pools (max_restarts=-1, max_task_retries=-1), relied on here.
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
        **_actor_resources(cfg, num_gpus),
    )


def effective_batch_size(n_rows: int, workers: int, requested: int) -> int:
    """Batch size that leaves each worker several batches, so the job's tail is short."""
    return max(1, min(requested, math.ceil(n_rows / (workers * 4))))


# --------------------------------------------------------------------------------------------------
# Passage encoding for an index build
# --------------------------------------------------------------------------------------------------


class PassageEncoder:
    """A Ray Data callable class: loads the dense encoder once per actor and embeds passages.

    Rows hold ``i`` (the passage's position in the corpus) and ``text`` (what the index embeds, see
    :func:`retrievers.index.indexed_text`); output rows hold ``i`` and ``emb``, the L2-normalised
    float32 vector the local build computes.

    Args:
        retriever_config: The config's ``retriever`` section (encoder name, batch size).
        threads: torch threads for this actor.
    """

    def __init__(self, retriever_config: Any, threads: int | None = 1) -> None:
        _set_worker_env()
        import torch

        from retrievers.dense import DenseRetriever

        if threads:
            torch.set_num_threads(threads)
        self.dense = DenseRetriever.from_config(retriever_config)
        self.dense.encoder  # noqa: B018 - load now, once per actor

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        emb = self.dense.encode(list(batch["text"]))
        return {"i": batch["i"], "emb": emb}


def encode_passages(
    texts: Sequence[str],
    retriever_config: Any,
    *,
    workers: int = 1,
    batch_size: int = 256,
    threads: int | None = 1,
    progress: Any = None,
) -> Any:
    """Embed ``texts`` on a pool of Ray actors; return the ``(len(texts), dim)`` float32 matrix in order.

    Args:
        texts: What the index embeds, one per passage, in corpus order.
        retriever_config: The ``retriever`` config section naming the encoder.
        workers: Actors, each holding one encoder.
        batch_size: Passages per ``map_batches`` call.
        threads: torch threads per actor.
        progress: An optional progress bar with ``update(n)``.

    Raises:
        RuntimeError: A passage came back twice or not at all (never expected).
    """
    import numpy as np

    ray = require_ray()
    n = len(texts)
    items = [{"i": i, "text": t} for i, t in enumerate(texts)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(n / batch_size)))
    out = ds.map_batches(
        PassageEncoder,
        fn_constructor_kwargs={"retriever_config": retriever_config, "threads": threads},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
        num_cpus=1,
    )
    emb: Any = None
    seen = np.zeros(n, dtype=bool)
    for batch in out.iter_batches(batch_format="numpy", batch_size=None):
        idx = np.asarray(batch["i"], dtype=np.int64)
        vec = np.asarray(batch["emb"], dtype=np.float32)
        if emb is None:
            emb = np.empty((n, vec.shape[1]), dtype=np.float32)
        if seen[idx].any():
            raise RuntimeError(f"passage {int(idx[seen[idx]][0])} was encoded twice")
        emb[idx] = vec
        seen[idx] = True
        if progress is not None:
            progress.update(len(idx))
    if n and not seen.all():
        raise RuntimeError(f"{int((~seen).sum())} passages came back without a vector")
    return emb
