"""Keeps the gateway's Triton serving, beside the launcher that starts it.

`TritonSupervisor.wait_ready()` waits for the first readiness (`TritonClient.readiness()`, the one
readiness check); `watch()` then polls it, reports every change to the health service, and starts a
Triton the gateway launched again when it exits or stays not ready longer than
`triton.hung_restart_s`: on the same ports, after `restart_delay` (exponential backoff), with health
NOT_SERVING meanwhile. A Triton given by URL is only followed, never restarted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from server.errors import BackendUnavailable
from server.launcher import TritonLaunchError, TritonProcess
from server.settings import TritonSettings
from server.triton import TritonClient

logger = logging.getLogger(__name__)

HEALTH_POLL_S = 2.0


def restart_delay(attempt: int, first_s: float, max_s: float) -> float:
    """Seconds to wait before restart `attempt` (0 = the first) of a run: first_s doubled each
    attempt, at most max_s."""
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    return min(first_s * 2.0 ** min(attempt, 32), max_s)  # capped exponent: no float overflow


class TritonSupervisor:
    def __init__(
        self,
        settings: TritonSettings,
        client: TritonClient,
        process: TritonProcess | None,
        *,
        set_health: Callable[[bool, str], Awaitable[None]],
        on_restart: Callable[[], None] = lambda: None,
    ):
        """`process`: the Triton the gateway launched (None: given by URL). `set_health(serving,
        reason)` reports a change; `on_restart()` counts each start after the first."""
        self.settings = settings
        self.client = client
        self.process = process
        self.set_health = set_health
        self.on_restart = on_restart

    async def wait_ready(self) -> None:
        """Until Triton is ready: `TritonLaunchError` when a launched one fails to start,
        `BackendUnavailable` when one given by URL is not ready in `startup_timeout_s`."""
        if self.process is not None:
            await self.process.wait_ready_async(self.client, self.settings.startup_timeout_s)
        else:
            await self.client.wait_ready(self.settings.startup_timeout_s)

    async def watch(self) -> None:
        """Health follows Triton's readiness; a launched Triton that exited or hung is restarted."""
        loop = asyncio.get_running_loop()
        serving, since = True, loop.time()
        attempt = 0  # restarts in the current run of failures
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            ready = await self.client.is_ready()
            if ready != serving:
                logger.warning("Triton is %s", "ready again" if ready else "NOT ready")
                if ready:
                    self.client.forget_models()
                await self.set_health(ready, "Triton is not ready")
                serving, since = ready, loop.time()
            if ready:
                if loop.time() - since > self.settings.restart_backoff_max_s:
                    attempt = 0  # it stayed up: a later crash is a new run, not part of a loop
                continue
            process = self.process
            if process is None:
                continue
            exited = process.exit_code is not None
            hung = not exited and loop.time() - since > self.settings.hung_restart_s
            if hung:
                logger.warning("Triton (pid %s) has not been ready for %.0f s; restarting it",
                               process.pid, loop.time() - since)
            if exited or hung:
                attempt = await self._restart(attempt)
                self.client.forget_models()
                await self.set_health(True, "")
                serving, since = True, loop.time()

    async def _restart(self, attempt: int) -> int:
        """Start our Triton again, on the same ports, until it is ready; returns the attempt count.

        Waits `restart_delay` (`triton.restart_backoff_s`, doubling up to `restart_backoff_max_s`)
        before each start, so a crash-looping Triton does not spin. A start that fails (e.g. a
        model that does not load) is logged with the model's error and retried.
        """
        process = self.process
        start_failed = False
        while True:
            # Ends what is left of the last run (a hung server; a no-op when it exited).
            code = await asyncio.to_thread(process.terminate)
            t = self.settings
            delay = restart_delay(attempt, t.restart_backoff_s, t.restart_backoff_max_s)
            attempt += 1
            cause = "its last start failed" if start_failed else f"tritonserver exited with code {code}"
            reason = f"Triton is restarting ({cause})"
            await self.set_health(False, reason)
            logger.warning("%s; starting it again in %g s (attempt %d)", reason, delay, attempt)
            await asyncio.sleep(delay)
            self.on_restart()
            try:
                process.start()  # in the event loop's (main) thread: the child dies with it
                await process.wait_ready_async(self.client, t.startup_timeout_s)
            except (TritonLaunchError, BackendUnavailable, OSError) as exc:
                logger.error("Triton restart failed: %s", exc)
                start_failed = True
                continue
            logger.warning("Triton restarted (pid %s) after %d attempt(s)", process.pid, attempt)
            return attempt
