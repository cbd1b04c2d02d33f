"""prometheus_client without its package __init__ until something needs it.

The package's __init__ imports all of the library: its HTTP, WSGI and ASGI servers and the push-gateway
client, and with them http.server, urllib.request, wsgiref and email (about 50 modules, 4 MB of RSS). The
exporter serves and renders its own text; it uses the registry, the metric families, Sample and the
ProcessCollector, whose modules import none of that. So after install() the package's first import
leaves it unexecuted: its submodules import as usual from its directory, and the first read of a name only __init__ defines
(`from prometheus_client import generate_latest`) runs that __init__ in place, so a caller that wants the
whole package still gets all of it. The exporter imports submodules only (prometheus_client.registry,
.metrics_core, .samples, .process_collector, .openmetrics.exposition).
"""
from __future__ import annotations

import importlib.util
import sys
import threading
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:  # (importlib.abc itself imports 15 modules)
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec

NAME = "prometheus_client"


def install() -> None:
    """Have the first import of the package load it lazily (nothing is imported now: `python -m
    exporter.healthcheck` never loads it). A no-op if it is imported already."""
    if NAME not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


class _Finder:
    """Finds the package as the next finders do, with _LazyInit as its loader; once."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if name != NAME:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(NAME)
        if spec is not None and spec.loader is not None and spec.submodule_search_locations is not None:
            spec.loader = cast("Loader", _LazyInit(spec.loader))
        return spec  # (not a package, or not installed: as it would have been)


class _LazyInit:
    """The package's loader, deferring its exec_module()."""

    def __init__(self, loader: Loader) -> None:
        self._loader = loader

    def create_module(self, spec: ModuleSpec) -> None:
        return None  # the default module

    def exec_module(self, module: ModuleType) -> None:
        """Not __init__ yet: its submodules import from __path__ as usual; the first read of a name not
        set yet runs it in place (PEP 562 module __getattr__)."""
        lock = threading.RLock()
        ran = False

        def getattr_(name: str) -> Any:
            nonlocal ran
            with lock:  # another thread waits for the whole __init__; this one's nested imports pass
                if not ran:
                    ran = True
                    self._loader.exec_module(module)
            try:
                return module.__dict__[name]
            except KeyError:  # (also while __init__ runs: `from . import x` then imports submodule x)
                raise AttributeError(f"module {NAME!r} has no attribute {name!r}") from None

        setattr(module, "__getattr__", getattr_)
