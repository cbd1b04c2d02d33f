"""Builds the C stand-in for libnvidia-ml.so.1 (nvml_stub.c) and points the real pynvml at it.

Two ways in:
- another process (the exporter, bench/capture_gpu.py): `stub.env()` sets LD_LIBRARY_PATH, so pynvml's
  own `CDLL("libnvidia-ml.so.1")` finds the stand-in first;
- this process: `stub.bind()` puts the stand-in where pynvml keeps its loaded library (the module global
  `nvmlLib`, with its function-pointer cache) and `unbind()` puts back what was there. pynvml loads the
  library only once per process, so LD_LIBRARY_PATH set now would be ignored.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("nvml_stub.c")
LIBRARY_NAME = "libnvidia-ml.so.1"  # the file name pynvml's CDLL looks for on LD_LIBRARY_PATH
# A soname of its own: had it libnvidia-ml.so.1's, once bound here glibc would hand the stand-in to any
# later CDLL("libnvidia-ml.so.1") in this process, and tests expecting "no NVML" would find two GPUs.
SONAME = "libnvml-stand-in.so"


def build(out_dir: Path) -> Path:
    """gcc the stand-in into out_dir; raises with gcc's message on any warning or error."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("gcc not found: the NVML stand-in is built with it (apt-get install gcc)")
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / LIBRARY_NAME
    r = subprocess.run([gcc, "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", f"-Wl,-soname,{SONAME}",
                        "-o", str(lib), str(SOURCE), "-lpthread", "-lm"], capture_output=True, text=True, timeout=120)
    if r.returncode != 0 or r.stderr.strip():
        raise RuntimeError(f"building the NVML stand-in failed:\n{r.stderr}")
    return lib


class NvmlStub:
    """The built stand-in and the key=value file it reads (see nvml_stub.c for the keys)."""

    def __init__(self, lib: Path, config: Path) -> None:
        self.lib = lib
        self.config = config
        self._saved: tuple[Any, dict, str | None] | None = None
        self.configure()

    def configure(self, values: dict[str, Any] | None = None, **more: Any) -> None:
        """Replace the whole configuration. Keys with dots (fail.nvmlX, gpm.2) go in `values`."""
        items = {**(values or {}), **more}
        text = "".join(f"{k}={v}\n" for k, v in items.items())
        before = self.config.stat().st_mtime_ns if self.config.exists() else None
        # The stand-in notices a change by mtime and size; wait out a coarse file clock so it always does.
        for _ in range(100):
            tmp = self.config.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.config)
            if self.config.stat().st_mtime_ns != before:
                return
            time.sleep(0.005)
        raise RuntimeError("the stand-in's config file mtime did not change")

    def env(self) -> dict[str, str]:
        """Environment for a process whose pynvml should load the stand-in."""
        path = os.environ.get("LD_LIBRARY_PATH")
        return {"LD_LIBRARY_PATH": f"{self.lib.parent}{os.pathsep + path if path else ''}",
                "NVML_STUB_CONFIG": str(self.config)}

    def bind(self) -> Any:
        """Make this process's pynvml call the stand-in; returns the pynvml module."""
        import pynvml

        self._saved = (pynvml.nvmlLib, dict(pynvml._nvmlGetFunctionPointer_cache),
                       os.environ.get("NVML_STUB_CONFIG"))
        os.environ["NVML_STUB_CONFIG"] = str(self.config)
        pynvml.nvmlLib = ctypes.CDLL(str(self.lib))
        pynvml._nvmlGetFunctionPointer_cache.clear()
        return pynvml

    def calls(self) -> dict[str, int]:
        """Driver calls per C function since load (or the last reset_calls), counted by the stand-in in this
        process: what pynvml really asked, two-call buffers included."""
        lib = ctypes.CDLL(str(self.lib))
        buf = ctypes.create_string_buffer(1 << 16)
        n = lib.nvmlStubCalls(buf, ctypes.c_uint(len(buf)))
        out = {}
        for line in buf.raw[:n].decode().splitlines():
            name, count = line.rsplit(" ", 1)
            if int(count):
                out[name] = int(count)
        return out

    def reset_calls(self) -> None:
        ctypes.CDLL(str(self.lib)).nvmlStubResetCalls()

    def unbind(self) -> None:
        import pynvml

        if self._saved is not None:
            pynvml.nvmlLib, cache, config = self._saved
            pynvml._nvmlGetFunctionPointer_cache.clear()
            pynvml._nvmlGetFunctionPointer_cache.update(cache)
            if config is None:
                os.environ.pop("NVML_STUB_CONFIG", None)
            else:
                os.environ["NVML_STUB_CONFIG"] = config
            self._saved = None
