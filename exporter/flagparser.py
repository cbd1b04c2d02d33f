"""The argument parser both commands use (the exporter's flags, `diagnose`): one-line errors with exit 2,
no abbreviations (`--fake-gpu 2` is a typo, not --fake-gpus), and a close match for a mistyped flag."""
from __future__ import annotations

import argparse
import difflib
from typing import NoReturn


class FlagParser(argparse.ArgumentParser):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(allow_abbrev=False, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:  # one line, exit 2, no usage dump
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            args = message[len(prefix):].split()
            flags = [a for a in args if a.startswith("-")]  # a mistyped flag's value is not worth a word
            message = prefix + ", ".join(self.unknown(arg) for arg in flags or args)
        self.exit(2, f"{self.prog}: error: {message}\n")

    def unknown(self, arg: str) -> str:
        """'--web.listen-adress (did you mean --web.listen-address?)', with argparse's words around it."""
        flag = arg.partition("=")[0]
        shown = flag if len(flag) <= 80 else flag[:80] + "..."
        if not flag.startswith("-"):
            return repr(shown)
        match = close_match(flag, [o for a in self._actions for o in a.option_strings])
        return shown + (f" (did you mean {match}?)" if match else "")


def close_match(word: str, candidates: list[str]) -> str | None:
    """The closest candidate (difflib), None when nothing is close; long words are cut before comparing."""
    found = difflib.get_close_matches(word[:100], candidates, n=1, cutoff=0.75)
    return found[0] if found else None
