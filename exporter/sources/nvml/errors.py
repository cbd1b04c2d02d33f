"""How NVML's errors are told apart: not supported, no permission, GPU lost, driver gone."""
from __future__ import annotations

LOST_ERRORS = ("NVMLError_GpuIsLost", "NVMLError_ResetRequired")
# Calls that mean "this GPU/driver cannot do that" rather than "it failed this time".
UNSUPPORTED_ERRORS = ("NVMLError_NotSupported", "NVMLError_FunctionNotFound")
# Lacking a privilege does not change while the process runs: counted and logged once, then not asked again.
DENIED_ERRORS = ("NVMLError_NoPermission",)
# The library lost its driver (unloaded or reloaded under us): NVML must be initialised again.
DRIVER_GONE_ERRORS = ("NVMLError_Uninitialized", "NVMLError_DriverNotLoaded", "NVMLError_LibraryNotFound")


def error_name(exc: BaseException) -> str:
    return type(exc).__name__
