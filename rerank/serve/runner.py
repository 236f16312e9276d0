"""Inference off the event loop: one worker thread owns the pipeline, a gate bounds what waits for it.

The model is not re-entrant across threads under load, so every call that touches it (loading, the
tokenizer, the probe) runs in one thread, one job at a time, in arrival order. The event loop never
blocks on the model: it admits a request (or refuses it with :class:`Overloaded` when
``max_concurrent`` are already running or queued), waits for the job to *start* at most ``max_queue_s``
(else :class:`QueueTimeout`, and the job is dropped unrun), then awaits its result.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from rerank.interrupt import Interrupted, interruptible

__all__ = ["InferenceWorker", "NotReady", "Overloaded", "QueueTimeout", "RequestGate"]

logger = logging.getLogger(__name__)


class NotReady(RuntimeError):
    """The model is still loading, failed to load, or the worker stopped."""


class Overloaded(RuntimeError):
    """Too many requests running or queued; ``retry_after`` is a hint in whole seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueTimeout(TimeoutError):
    """A request waited longer than the queue limit for the model; it was not run."""


class _Job:
    """One call waiting for the worker; ``cancel`` succeeds only before it starts."""

    def __init__(self, fn: Callable[[Any], Any], on_start: Callable[[], None] | None) -> None:
        self.fn = fn
        self.on_start = on_start
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.finished: float | None = None
        self._lock = threading.Lock()
        self._cancelled = False
        #: Set when the caller is gone: a running job stops at its next window (rerank.interrupt).
        self.stop = threading.Event()

    def cancel(self) -> bool:
        """Drop the job if it has not started (True); else ask it to stop at its next window (False)."""
        with self._lock:
            self.stop.set()
            if self.started is not None:
                return False
            self._cancelled = True
            return True

    def begin(self) -> bool:
        with self._lock:
            if self._cancelled:
                return False
            self.started = time.perf_counter()
            return True


class InferenceWorker:
    """The one thread that builds the pipeline and then runs jobs on it, in order.

    Args:
        build: Called once in the worker thread; returns the object jobs receive (the pipeline).
        warmup: Called once with that object after building, so the first request is not the slow one.
        on_failure: Called (in the worker thread) with the error message when ``build`` raises.

    ``state`` is ``idle`` before :meth:`start`, then ``loading``, ``ready``, ``failed`` or ``stopped``.
    """

    def __init__(
        self,
        build: Callable[[], Any],
        *,
        warmup: Callable[[Any], Any] | None = None,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self._build = build
        self._warmup = warmup
        self.on_failure = on_failure
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.state = "idle"
        self.error: str | None = None
        self.target: Any = None
        self.loaded = threading.Event()
        # Exponential moving average of job seconds, for Retry-After hints.
        self.mean_job_s = 1.0
        self.jobs_started = 0
        self.jobs_interrupted = 0

    def start(self) -> InferenceWorker:
        """Start the thread (idempotent); loading begins at once."""
        if self._thread is None:
            self.state = "loading"
            self._thread = threading.Thread(target=self._main, name="attn-rerank-inference", daemon=True)
            self._thread.start()
        return self

    def _main(self) -> None:
        t0 = time.perf_counter()
        try:
            self.target = self._build()
            if self._warmup is not None:
                self._warmup(self.target)
        except Exception as exc:  # any load failure must be reported, not kill the thread silently
            logger.exception("loading the model failed")
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            self.loaded.set()
            if self.on_failure is not None:
                self.on_failure(self.error)
            self._fail_queued()
            return
        logger.info("model ready in %.1f s", time.perf_counter() - t0)
        self.state = "ready"
        self.loaded.set()
        while True:
            job = self._queue.get()
            if job is None:
                break
            self._run(job)
        self.state = "stopped"
        self._fail_queued()

    def _run(self, job: _Job) -> None:
        if not job.begin():
            job.future.cancel()
            return
        self.jobs_started += 1
        if job.on_start is not None:
            job.on_start()
        try:
            with interruptible(job.stop):
                result = job.fn(self.target)
        except BaseException as exc:
            if isinstance(exc, Interrupted):
                self.jobs_interrupted += 1  # handed to the awaiting request, which turns it into a response
            job.finished = time.perf_counter()
            job.future.set_exception(exc)
        else:
            job.finished = time.perf_counter()
            job.future.set_result(result)
        took = job.finished - (job.started or job.finished)
        self.mean_job_s = 0.8 * self.mean_job_s + 0.2 * took

    def _fail_queued(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None and not job.future.done():
                job.future.set_exception(NotReady(f"the model is {self.state}"))

    def submit(self, fn: Callable[[Any], Any], on_start: Callable[[], None] | None = None) -> _Job:
        """Queue ``fn(target)``; ``on_start`` is called in the worker thread just before it runs."""
        job = _Job(fn, on_start)
        if self.state != "ready":
            job.future.set_exception(NotReady(f"the model is {self.state}"))
            return job
        self._queue.put(job)
        return job

    def call(self, fn: Callable[[Any], Any], timeout: float | None = None) -> Any:
        """Run ``fn(target)`` on the worker and wait for it (for callers outside the event loop)."""
        return self.submit(fn).future.result(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the queued jobs, then end the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)


class RequestGate:
    """Admission control in front of a worker, used from one event loop.

    Args:
        worker: The inference worker.
        max_concurrent: Requests running or queued at once; one more raises :class:`Overloaded`.
        max_queue_s: Longest wait for the worker before :class:`QueueTimeout`.
    """

    def __init__(self, worker: InferenceWorker, max_concurrent: int, max_queue_s: float) -> None:
        self.worker = worker
        self.max_concurrent = max_concurrent
        self.max_queue_s = max_queue_s
        # Only the event loop's thread touches this counter.
        self.active = 0

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead at the mean job time, at least 1."""
        return max(1, math.ceil(self.worker.mean_job_s * max(1, self.active)))

    async def run(self, fn: Callable[[Any], Any]) -> tuple[Any, float, float]:
        """Run ``fn(pipeline)`` on the worker; returns (result, seconds queued, seconds running).

        Raises:
            NotReady: The model is not loaded.
            Overloaded: ``max_concurrent`` requests are already admitted.
            QueueTimeout: The job did not start within ``max_queue_s``.
            Exception: Whatever ``fn`` raised.
        """
        if self.worker.state != "ready":
            raise NotReady(f"the model is {self.worker.state}")
        if self.active >= self.max_concurrent:
            raise Overloaded(
                f"{self.active} requests are running or queued (--max-concurrent-requests "
                f"{self.max_concurrent}); retry later",
                self.retry_after(),
            )
        self.active += 1
        loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = loop.create_future()

        def _mark() -> None:
            if not started.done():
                started.set_result(None)

        job = None
        try:
            job = self.worker.submit(fn, on_start=lambda: loop.call_soon_threadsafe(_mark))
            result_future = asyncio.wrap_future(job.future)
            if not job.future.done():
                done, _ = await asyncio.wait(
                    {started, result_future}, timeout=self.max_queue_s, return_when=asyncio.FIRST_COMPLETED
                )
                if not done and job.cancel():
                    raise QueueTimeout(
                        f"the request waited {self.max_queue_s * 1000:.0f} ms for the model "
                        "(--max-queue-ms) and was not run"
                    )
            result = await result_future
        except asyncio.CancelledError:
            # The client went away: drop the job if it has not started; a started one stops at its next
            # window boundary.
            if job is not None:
                job.cancel()
            raise
        finally:
            self.active -= 1
            if not started.done():
                started.cancel()
        queued = (job.started or job.submitted) - job.submitted
        ran = (job.finished or job.started or job.submitted) - (job.started or job.submitted)
        return result, queued, ran
