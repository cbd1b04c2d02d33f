"""Reading kernel-generated files cheaply, tick after tick."""
from __future__ import annotations

import os
from pathlib import Path


class KernelFile:
    """A procfs/cgroupfs file kept open and re-read with pread: the kernel regenerates it on every read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def read(self) -> str:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        try:
            chunks = []
            offset = 0
            while True:
                chunk = os.pread(self._fd, 65536, offset)
                if not chunk:
                    break
                chunks.append(chunk)
                offset += len(chunk)
            return b"".join(chunks).decode("ascii")
        except OSError:
            self.close()  # reopen next time: the mount may have changed under us
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
