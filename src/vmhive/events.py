"""In-process fan-out of live events (VM state changes) to API listeners.

Publishing never blocks: each subscriber has a bounded queue, and a subscriber
that falls that far behind is told so with one `overflow` event and dropped, so
a stalled browser cannot grow the daemon's memory. It reconnects and refetches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

Event = tuple[str, dict[str, Any]]  # (kind, data)

OVERFLOW: Event = ("overflow", {})


class EventBus:
    MAX_QUEUED = 1000

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[Event]] = set()
        # In-process listeners, called at once (they must not block).
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []

    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=self.MAX_QUEUED + 1)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._subscribers.discard(queue)

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        for listener in self.listeners:
            listener(kind, data)
        for queue in list(self._subscribers):
            if queue.qsize() < self.MAX_QUEUED:
                queue.put_nowait((kind, data))
            else:
                queue.put_nowait(OVERFLOW)
                self._subscribers.discard(queue)
