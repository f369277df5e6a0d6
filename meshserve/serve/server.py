"""Running the app under uvicorn with a graceful drain on SIGTERM / SIGINT.

On the first signal the server keeps listening but turns /ready to 503 and answers new /v1 requests
with 503 + Retry-After, while in-flight requests run to completion; once none is left (or the drain
timeout passes) uvicorn shuts down and the process exits 0. At the drain timeout on_drain_timeout ends what is
still in flight (the server: a stream's error event and [DONE], a 503 otherwise), so no response is cut off
mid-body when uvicorn closes the connections. A second signal ends the drain at once the same way (uvicorn's own
forced exit cancelled the lifespan and request tasks, each printing a CancelledError traceback); a third is
uvicorn's forced exit.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

from meshserve.serve.middleware import ServerState

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose exit signals start a drain instead of closing the listener."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout_s: float,
                 on_listening: Callable[[], None] | None = None,
                 on_drain_timeout: Callable[[], None] | None = None):
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self._drain_deadline: float | None = None
        self._cut_short = False  # a second signal ended the drain early
        self.on_listening = on_listening  # called once the app has started and accepts connections
        self.on_drain_timeout = on_drain_timeout  # called once, when the drain runs out of time

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.on_listening is not None and self.started:
            self.on_listening()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not calling super(): uvicorn would re-raise the signal after shutdown, and exit non-zero.
        if self._cut_short:  # a third signal: uvicorn's forced exit
            self.should_exit = True
            self.force_exit = True
            return
        if self._drain_deadline is not None:
            self._cut_short = True
            self._drain_deadline = time.monotonic()  # the next tick ends what is in flight and shuts down
            logger.warning("second %s: stopping without finishing the drain (%d in-flight request(s) end with an "
                           "error)", signal.Signals(sig).name, self.state.num_in_flight)
            return
        self.begin_drain()
        logger.warning("%s: draining %d in-flight request(s), at most %.0f s", signal.Signals(sig).name,
                       self.state.num_in_flight, self.drain_timeout_s)

    def begin_drain(self) -> None:
        self.state.draining = True
        self._drain_deadline = time.monotonic() + self.drain_timeout_s

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self._drain_deadline is None:
            return False
        if self.state.num_in_flight == 0:
            logger.info("drained; shutting down")
            return True
        if time.monotonic() >= self._drain_deadline:
            if not self._cut_short:  # (a second signal said so already)
                logger.warning("drain timeout: %d request(s) still in flight end with an error",
                               self.state.num_in_flight)
            if self.on_drain_timeout is not None:
                self.on_drain_timeout()
            return True
        return False
