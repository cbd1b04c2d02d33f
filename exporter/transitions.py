"""Log a problem once when it starts and once when it clears, never once per tick."""
from __future__ import annotations

import logging


class TransitionLog:
    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._problems: dict[str, str] = {}

    def set(self, key: str, problem: str | None) -> None:
        """Record the current problem for key (None: healthy); logs only when it changes."""
        old = self._problems.get(key)
        if problem == old:
            return
        if problem is None:
            del self._problems[key]
            self._logger.info("%s: recovered", key)
        else:
            self._problems[key] = problem
            self._logger.warning("%s: %s", key, problem)

    def update(self, prefix: str, problems: dict[str, str]) -> None:
        """Replace every problem under prefix with `problems` (sub-key -> text)."""
        for key in [k for k in self._problems if k.startswith(prefix + " ")]:
            if key[len(prefix) + 1 :] not in problems:
                self.set(key, None)
        for sub, text in problems.items():
            self.set(f"{prefix} {sub}", text)
