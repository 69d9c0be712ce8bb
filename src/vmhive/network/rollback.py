"""Undo steps for multi-step host changes: all of them happen, or none stay."""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger(__name__)


class Rollback:
    """Collects undo steps; if the ``with`` block raises, runs them newest first.

    A failing undo step is logged and the others still run; the original error
    is what propagates.
    """

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], object]]] = []

    def add(self, description: str, undo: Callable[[], object]) -> None:
        self._steps.append((description, undo))

    def __enter__(self) -> Rollback:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            return
        for description, undo in reversed(self._steps):
            try:
                undo()
            except Exception:
                log.exception("rollback step failed: %s", description)
