"""A periodic async task: the registry's alias watcher (re-reads production aliases every
``poll_s``). Errors of one round are logged and the next round runs anyway; ``poke()`` runs a
round now (e.g. after a repository load)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("forgeline.serving")


class Poller:
    def __init__(self, interval_s: float, round: Callable[[], Awaitable[None]], *, name: str = "forgeline-poller"):
        if interval_s <= 0:
            raise ValueError(f"poll interval must be positive, got {interval_s}")
        self.interval_s = interval_s
        self._round = round
        self._name = name
        self._task: asyncio.Task | None = None
        self._kick: asyncio.Event | None = None
        self.rounds = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self.running:
            return
        self._kick = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=self._name)

    def poke(self) -> None:
        if self._kick is not None:
            self._kick.set()

    async def _loop(self) -> None:
        assert self._kick is not None
        while True:
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a bad round must not stop the watcher
                log.warning("%s: round failed: %s", self._name, e)
            self.rounds += 1
            try:
                await asyncio.wait_for(self._kick.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass
            self._kick.clear()

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001
            pass
        self._task = None


__all__ = ["Poller"]
