"""``attn-rerank run --engine ray`` and ``attn-rerank index build --engine ray``: the CLI jobs on Ray Data.

The run job keeps everything that makes the local engine's output trustworthy and changes only where
the queries are reranked. The driver validates the whole input first (the local engine's
:func:`~rerank.core.inputs.scan_input`, so bad lines are reported with the same line numbers and
messages before any worker starts), skips the qids already in the output, and sends the pending lines
to a pool of actors (:func:`~rerank.batch.ray_engine.rerank_dataset`). Results stream back in input
order and the driver appends each one with the local engine's fsynced
:class:`~rerank.core.output.LineWriter`: one output file, in input order, identical to a local run's, and
resumable after a SIGKILL of the driver exactly as a local run is. Rows that fail on a worker go to the
same errors file with the same wording.

Why one file written by the driver rather than shards written by the workers: the resume bookkeeping
(recover a torn last line, skip the qids present, exactly one line per qid) then has one owner, the
output reads the same whichever engine wrote it, and ``--trec-run`` works unchanged. A result line is a
few kB against seconds of model time per query, so the driver's writes are not the bottleneck.

The pending lines travel to the workers as rows of the dataset, so the input file need not be visible
on the workers (an ``--index`` folder must be, at the same path). The driver puts them into Ray's
object store one batch at a time; the store holds the pending input for the job's duration (spilling to
disk beyond its memory).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rerank.core.common import StrictAbort, UsageError, positive_int

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")

ProcessFn = Callable[..., int]
IndexFn = Callable[[Any, Sequence[Any], Any], None]


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--engine``, ``--workers`` and ``--address`` to a command's parser."""
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local: this process (default); ray: a pool of Ray Data actors, one model each "
        "(needs the extra: pip install 'attn-rerank[ray]')",
    )
    group.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        metavar="N",
        help="--engine ray: actors (default: one per GPU of the cluster when the config runs on CUDA, "
        "else one per CPU)",
    )
    group.add_argument(
        "--address",
        default=None,
        metavar="ADDR",
        help="--engine ray: the cluster, 'auto' (one running on this machine) or 'ray://HOST:PORT'; "
        "default: start a local cluster for this run",
    )


def _check_engine_args(args: argparse.Namespace) -> bool:
    """True for ``--engine ray`` (then Ray is importable); refuses Ray options without it."""
    if args.engine != "ray":
        if args.workers is not None or args.address is not None:
            raise UsageError("--workers and --address go with --engine ray")
        return False
    from rerank.batch.ray_engine import RayMissingError, require_ray

    try:
        require_ray()
    except RayMissingError as exc:
        raise UsageError(str(exc)) from None
    return True


def engine_process(args: argparse.Namespace, local: ProcessFn) -> ProcessFn:
    """The function that reranks the pending lines of ``run``: ``local``, or the Ray job.

    Called before the input is read, so a missing Ray or a misplaced option stops the run (exit 2)
    before any work.
    """
    return process_with_ray if _check_engine_args(args) else local


def index_builder(args: argparse.Namespace) -> IndexFn:
    """The function that indexes the passages of ``index build``: in this process, or encoding on Ray."""
    if _check_engine_args(args):
        return lambda retriever, passages, rcfg: index_with_ray(retriever, passages, rcfg, args)
    return lambda retriever, passages, rcfg: retriever.index(passages, show_progress=not args.no_progress)


def _default_workers(cuda: bool, n_tasks: int) -> int:
    import ray

    res = ray.cluster_resources()
    n = int(res.get("GPU", 0)) if cuda else int(res.get("CPU", 1))
    return max(1, min(n, n_tasks))


class _RayJob:
    """Connects to (or starts) Ray for one command and shuts down what it started."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = False

    def __enter__(self) -> _RayJob:
        from rerank.batch.ray_engine import init_ray, quiet_ray_data

        try:
            self.started = init_ray(self.args.address, verbose=getattr(self.args, "verbose", False))
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UsageError(f"cannot connect to Ray at {self.args.address}: {exc}") from None
        quiet_ray_data(show_progress=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            import ray

            ray.shutdown()


def _pending_dataset(inp: Path, pending: Sequence[tuple[int, int]], max_bytes: int, batch_size: int) -> Any:
    """The pending lines as a dataset of rows ``{line, raw}``, in input order, one block per batch.

    Each block goes into Ray's object store as soon as it is read, so the driver holds one batch of
    the input at a time; the object store keeps the pending input for the job (spilling to disk
    beyond its memory).
    """
    import pyarrow as pa
    import ray

    schema = pa.schema([("line", pa.int64()), ("raw", pa.binary())])
    refs = []
    for start in range(0, len(pending), batch_size):
        rows = _read_lines(inp, pending[start : start + batch_size], max_bytes)
        refs.append(ray.put(pa.Table.from_pylist(rows, schema=schema)))
    return ray.data.from_arrow_refs(refs)


def _read_lines(inp: Path, pending: Sequence[tuple[int, int]], max_bytes: int) -> list[dict[str, Any]]:
    rows = []
    with inp.open("rb") as f:
        for line, offset in pending:
            f.seek(offset)
            rows.append({"line": line, "raw": f.readline(max_bytes + 1)})
    return rows


def process_with_ray(
    args: argparse.Namespace,
    cfg: Any,
    inp: Path,
    pending: list[tuple[int, int]],
    writer: Any,
    errors: Any,
    tqdm: Any,
) -> int:
    """Rerank the validated pending lines on Ray; same contract as the local engine's ``_process``.

    Returns:
        The number of result lines written.

    Raises:
        StrictAbort: ``--strict`` and a row failed on a worker.
        UsageError: The workers could not build the pipeline (nothing was written).
    """
    if not pending:
        return 0
    with _RayJob(args):
        import ray
        import ray.exceptions

        from rerank.batch.ray_engine import _wants_cuda, effective_batch_size, rerank_dataset

        workers = args.workers or _default_workers(_wants_cuda(cfg), len(pending))
        batch_size = effective_batch_size(len(pending), workers, args.batch_size)
        ctx = ray.data.DataContext.get_current()
        # Results come back in input order: the output file reads as a local run's.
        ctx.execution_options.preserve_order = True
        ds = _pending_dataset(inp, pending, args.max_line_bytes, batch_size)
        results = rerank_dataset(
            ds,
            cfg,
            workers=workers,
            batch_size=batch_size,
            index_dir=args.index,
            top_k=args.top_k,
            max_line_bytes=args.max_line_bytes,
        )
        logger.info("ray: %d queries, %d workers, batches of %d", len(pending), workers, batch_size)
        processed = 0
        written: set[str] = set()
        bar = tqdm(
            total=len(pending), unit="q", desc="rerank (ray)", file=sys.stderr, disable=args.no_progress
        )
        errors.bar = bar
        try:
            for row in results.iter_rows():
                if row["error"]:
                    errors.report(int(row["line"]), row["error"], None, qid=row["qid"] or None)
                    if args.strict:
                        raise StrictAbort(f"{inp}:{row['line']}: {row['error']}")
                elif row["qid"] not in written:  # a retried batch never reaches here twice; be sure
                    writer.write(row["result"])
                    written.add(row["qid"])
                    processed += 1
                bar.update(1)
                bar.set_postfix(errors=errors.count, refresh=False)
        except ray.exceptions.RayError as exc:
            if processed:
                raise
            raise UsageError(
                f"the Ray job failed before any query was reranked: {_first_line(exc)}"
            ) from None
        finally:
            errors.bar = None
            bar.close()
    return processed


def _first_line(exc: BaseException) -> str:
    # A Ray error's text repeats the worker's traceback; its cause's last line says what went wrong.
    text = str(exc).strip().splitlines()
    meaningful = [t for t in text if t and not t.startswith((" ", "Traceback"))]
    last = meaningful[-1] if meaningful else type(exc).__name__
    return last.removeprefix("RuntimeError: ")  # QueryReranker's setup error says what failed


def index_with_ray(
    retriever: Any, passages: Sequence[Any], retriever_config: Any, args: argparse.Namespace
) -> None:
    """Index ``passages`` with ``retriever``, computing the dense vectors on Ray actors.

    BM25 (alone or in a hybrid index) is built in this process: tokenising is cheap next to encoding.
    The vectors come back in corpus order and the retriever builds and saves its usual index from
    them, so the folder is the one a local build writes.
    """
    from rerank.batch.ray_engine import encode_passages
    from retrievers.index import indexed_text

    dense = retriever if retriever.kind == "dense" else getattr(retriever, "dense", None)
    if dense is None:
        logger.warning("the %s retriever has no dense part: building it in this process", retriever.kind)
        retriever.index(passages, show_progress=not args.no_progress)
        return
    from tqdm.auto import tqdm

    texts = [indexed_text(p) for p in passages]
    with _RayJob(args):
        workers = args.workers or _default_workers(False, math.ceil(len(texts) / 64))
        bar = tqdm(total=len(texts), unit="p", desc="encode (ray)", file=sys.stderr, disable=args.no_progress)
        try:
            batch = max(1, min(256, math.ceil(len(texts) / (workers * 4))))
            emb = encode_passages(texts, retriever_config, workers=workers, batch_size=batch, progress=bar)
        finally:
            bar.close()

    def precomputed(batch_texts: Sequence[str], show_progress: bool = False) -> Any:
        if list(batch_texts) != texts:
            raise RuntimeError("the retriever asked for vectors of other texts than the corpus's")
        return emb

    dense.encode = precomputed  # the retriever's own index() builds FAISS from the workers' vectors
    try:
        retriever.index(passages, show_progress=not args.no_progress)
    finally:
        del dense.encode
