"""Size and use of a shared-memory mount (default /dev/shm): Docker's 64 MB default makes PyTorch
DataLoader workers fail with "Bus error" or fall back to slow paths."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ShmReading:
    path: str
    size_bytes: int
    used_bytes: int


def read_shm(path: str) -> ShmReading:
    """statvfs of the mount; OSError when it is not there (the sampler counts and logs it)."""
    st = os.statvfs(path)
    return ShmReading(path, st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize)
