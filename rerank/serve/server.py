"""Running the app under uvicorn with a draining shutdown.

On the first SIGTERM (or Ctrl-C) the server keeps its socket open but answers every new request with
503 (``/health`` included, so a load balancer stops sending), lets the requests already in flight
finish, then shuts down and exits 0. A second signal, or ``drain_timeout_s`` passing, ends it at once.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType
from typing import Any

import uvicorn

from rerank.serve.app import ServeState, create_app
from rerank.serve.settings import ServeSettings

__all__ = ["DrainingServer", "run_server"]

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose exit signal first drains the app's requests (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, state: ServeState) -> None:
        super().__init__(config)
        self.state = state
        self._drain_started: float | None = None
        self.failed = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Unlike uvicorn's handler, the signal is not re-raised after shutdown: a drained exit is a
        # clean exit (status 0), which is what process managers expect from SIGTERM.
        if self._drain_started is not None or self.should_exit:
            logger.warning("second %s: stopping without waiting", signal.Signals(sig).name)
            self.should_exit = True
            self.force_exit = True
            return
        logger.info("%s: draining %d request(s) in flight", signal.Signals(sig).name, self.state.in_flight)
        self.state.draining = True
        self._drain_started = time.monotonic()

    async def on_tick(self, counter: int) -> bool:
        if self._drain_started is not None and not self.should_exit:
            waited = time.monotonic() - self._drain_started
            if self.state.in_flight == 0:
                logger.info("drained in %.1f s", waited)
                self.should_exit = True
            elif waited > self.state.settings.drain_timeout_s:
                logger.warning("drain timeout: %d request(s) still in flight", self.state.in_flight)
                self.should_exit = True
        return await super().on_tick(counter)

    def stop_on_failure(self, error: str) -> None:
        """Called by the worker when the model cannot load: the process exits with status 1."""
        logger.error("cannot serve: %s", error)
        self.failed = True
        self.should_exit = True


def run_server(
    settings: ServeSettings, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info"
) -> int:
    """Serve until SIGTERM/Ctrl-C; returns the exit status (0 after a drain, 1 when the model failed).

    Args:
        settings: The service's limits and config.
        host: Interface to bind (``127.0.0.1`` keeps it local; ``0.0.0.0`` exposes it).
        port: TCP port.
        log_level: uvicorn's log level.
    """
    app = create_app(settings)
    state: ServeState = app.state.serve
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    server = DrainingServer(config, state)
    state.worker.on_failure = server.stop_on_failure
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind the port
        code: Any = exc.code
        return int(code) if isinstance(code, int) else 1
    return 1 if server.failed else 0
