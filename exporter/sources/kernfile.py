"""Reading kernel-generated files cheaply, tick after tick, and safely when a path is not what it should be.

`--path.procfs` and `--path.cgroupfs` are the user's: a FIFO there would block open() and read() forever
(and with them start-up or the sampler), /dev/zero never ends. So files are opened non-blocking, must be
regular files (procfs and cgroupfs files are), and are read up to a cap.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

# /proc/stat on a many-core machine with thousands of interrupt lines is a few hundred KiB.
MAX_BYTES = 4 * 2**20


class NotAKernelFile(OSError):
    """The path is not a regular file of bounded size (a FIFO, a device, a directory, something huge)."""

    def __init__(self, path: Path | str, why: str) -> None:
        super().__init__(errno.EINVAL, why, str(path))


def open_regular(path: Path | str) -> int:
    """An fd for reading path, never blocking on the open; NotAKernelFile unless it is a regular file.

    procfs and cgroupfs files report size 0 (they are generated on read); a regular file that says it is
    larger than MAX_BYTES is refused before a byte is read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        _check(os.fstat(fd), path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path | str, max_bytes: int) -> bytes:
    """The start of a regular file, opened as open_regular does (a FIFO or device given for a config or
    certificate file must not block start-up or a reload): at most max_bytes + 1 bytes, so the caller can
    tell a file longer than max_bytes and refuse it with its own message."""
    with os.fdopen(open_regular(path), "rb") as f:
        return f.read(max_bytes + 1)


def check_regular(path: Path | str) -> None:
    """Raise OSError unless path is a regular file within the cap: for files a library opens itself."""
    _check(os.stat(path), path)


def _check(st: os.stat_result, path: Path | str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise NotAKernelFile(path, "not a regular file")
    if st.st_size > MAX_BYTES:
        raise NotAKernelFile(path, f"larger than {MAX_BYTES} bytes")


def _read_fd(fd: int, path: Path | str) -> str:
    chunks = []
    offset = 0
    while True:
        chunk = os.pread(fd, 65536, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        if offset > MAX_BYTES:
            raise NotAKernelFile(path, f"larger than {MAX_BYTES} bytes")
    # Kernel files are ASCII; anything else is not one (UnicodeDecodeError is a ValueError).
    return b"".join(chunks).decode("ascii")


def read_once(path: Path | str) -> str:
    """The whole of a kernel file, opened and closed again (for files read once, e.g. per process)."""
    fd = open_regular(path)
    try:
        return _read_fd(fd, path)
    finally:
        os.close(fd)


class KernelFile:
    """A procfs/cgroupfs file kept open and re-read with pread: the kernel regenerates it on every read.

    read() raises OSError (missing, not a regular file, too large) or ValueError (not ASCII).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def read(self) -> str:
        if self._fd is None:
            self._fd = open_regular(self.path)
        try:
            return _read_fd(self._fd, self.path)
        except OSError:
            self.close()  # reopen next time: the mount may have changed under us
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
