"""Log a problem once when it starts and once when it clears, never once per tick."""
from __future__ import annotations

import logging


class TransitionLog:
    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._problems: dict[str, str] = {}

    def set(self, key: str, problem: str | None, detail: str = "") -> None:
        """Record the current problem for key (None: healthy); logs only when it changes. `detail` (e.g. an
        exception's text, which may differ from tick to tick) is logged with the change, not compared."""
        old = self._problems.get(key)
        if problem == old:
            return
        if problem is None:
            del self._problems[key]
            self._logger.info("%s: recovered", key)
        else:
            self._problems[key] = problem
            self._logger.warning("%s: %s%s", key, problem, f" ({detail})" if detail else "")

    def update(self, prefix: str, problems: dict[str, str], detail: str = "") -> None:
        """Replace every problem under prefix with `problems` (sub-key -> text)."""
        for key in [k for k in self._problems if k.startswith(prefix + " ")]:
            if key[len(prefix) + 1 :] not in problems:
                self.set(key, None)
        for sub, text in problems.items():
            self.set(f"{prefix} {sub}", text, detail)
