"""Every flag can also be set from a GPU_EXPORTER_* variable; the health check reads the same names."""
from __future__ import annotations

import re

ENV_PREFIX = "GPU_EXPORTER_"


def env_name(flag: str) -> str:
    """--sample.interval -> GPU_EXPORTER_SAMPLE_INTERVAL"""
    return ENV_PREFIX + re.sub(r"[.-]", "_", flag.lstrip("-")).upper()
