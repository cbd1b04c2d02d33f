"""prometheus_client without its package __init__ until something needs it.

The package's __init__ imports all of the library: its HTTP, WSGI and ASGI servers and the push-gateway
client, and with them http.server, urllib.request, wsgiref and email (about 50 modules, 4 MB of RSS). The
exporter serves and renders its own text; it uses the registry, the metric families, Sample and the
ProcessCollector, whose modules import none of that. So install() registers the package unexecuted: its
submodules import as usual from its directory, and the first read of a name only __init__ defines
(`from prometheus_client import generate_latest`) runs that __init__ in place, so a caller that wants the
whole package still gets all of it. The exporter imports submodules only (prometheus_client.registry,
.metrics_core, .samples, .process_collector, .openmetrics.exposition).
"""
from __future__ import annotations

import importlib.util
import sys
import threading
from typing import Any

NAME = "prometheus_client"


def install() -> None:
    """Register the package lazily, unless it is imported already (then it stays as it is)."""
    if NAME in sys.modules:
        return
    spec = importlib.util.find_spec(NAME)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not installed as a package: the imports fail as they would have
    package = importlib.util.module_from_spec(spec)  # __path__ set: its submodules import as usual
    lock = threading.RLock()
    ran = False

    def getattr_(name: str) -> Any:
        nonlocal ran
        with lock:  # another thread waits for the whole __init__; this one's nested imports pass through
            if not ran:
                ran = True
                spec.loader.exec_module(package)  # type: ignore[union-attr]  # checked above
        try:
            return package.__dict__[name]
        except KeyError:  # (also while __init__ runs: `from . import x` then imports the submodule x)
            raise AttributeError(f"module {NAME!r} has no attribute {name!r}") from None

    setattr(package, "__getattr__", getattr_)  # PEP 562: asked only for names not set yet
    sys.modules[NAME] = package
