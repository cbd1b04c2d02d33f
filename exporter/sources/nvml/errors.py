"""The one classifier of NVML's errors and the policy for each class, used by every NVML call on a read
path (the scalar reads, GPM, NVLink, the PCIe fallback), so one answer means the same on all of them.

| class       | answers                                              | asked again | counted | GPU up | NVML   |
|-------------|------------------------------------------------------|-------------|---------|--------|--------|
| unsupported | NotSupported, FunctionNotFound,                      | no          | no      | yes    |        |
|             | ArgumentVersionMismatch, NVMLLibraryMismatchError    |             |         |        |        |
| denied      | NoPermission                                         | no          | once    | yes    |        |
| bug         | TypeError (our arguments do not fit this binding)    | no          | once    | yes    |        |
| lost        | GpuIsLost, ResetRequired                             | reopened    | yes     | no     |        |
| driver-gone | Uninitialized, DriverNotLoaded, LibraryNotFound      | after init  | yes     | no     | reinit |
| transient   | anything else (Unknown, Timeout, InsufficientSize..) | next tick   | yes     | no     |        |
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

log = logging.getLogger("exporter.nvml")


class Fault(enum.Enum):
    UNSUPPORTED = "unsupported"  # this GPU, driver or binding cannot do that: it will not change
    DENIED = "denied"  # a privilege the process lacks: it will not change while it runs
    BUG = "bug"  # a TypeError from our own call: wrong arguments for this binding
    LOST = "lost"  # the GPU fell off the bus or needs a reset
    DRIVER_GONE = "driver-gone"  # the library lost its driver (unloaded or reloaded): initialise again
    TRANSIENT = "transient"  # failed this time


@dataclass(frozen=True, slots=True)
class Policy:
    ask_again: bool  # False: the call is recorded once and not made again for this GPU
    counted: bool  # in exporter_errors_total (once where not asked again)
    gpu_up: bool  # the GPU stays up (gpu_up 1) on this answer
    reinit: bool  # NVML must be initialised again


POLICY: dict[Fault, Policy] = {
    Fault.UNSUPPORTED: Policy(ask_again=False, counted=False, gpu_up=True, reinit=False),
    Fault.DENIED: Policy(ask_again=False, counted=True, gpu_up=True, reinit=False),
    Fault.BUG: Policy(ask_again=False, counted=True, gpu_up=True, reinit=False),
    Fault.LOST: Policy(ask_again=True, counted=True, gpu_up=False, reinit=False),
    Fault.DRIVER_GONE: Policy(ask_again=True, counted=True, gpu_up=False, reinit=True),
    Fault.TRANSIENT: Policy(ask_again=True, counted=True, gpu_up=False, reinit=False),
}

_BY_NAME = {
    "NVMLError_NotSupported": Fault.UNSUPPORTED,
    "NVMLError_FunctionNotFound": Fault.UNSUPPORTED,
    "NVMLError_ArgumentVersionMismatch": Fault.UNSUPPORTED,  # a struct version this driver does not know
    "NVMLLibraryMismatchError": Fault.UNSUPPORTED,  # pynvml: the library is older than the call
    "NVMLError_NoPermission": Fault.DENIED,
    "NVMLError_GpuIsLost": Fault.LOST,
    "NVMLError_ResetRequired": Fault.LOST,
    "NVMLError_Uninitialized": Fault.DRIVER_GONE,
    "NVMLError_DriverNotLoaded": Fault.DRIVER_GONE,
    "NVMLError_LibraryNotFound": Fault.DRIVER_GONE,
}


def error_name(exc: BaseException) -> str:
    return type(exc).__name__


def classify(exc: BaseException) -> Fault:
    """The class of an exception an NVML call raised."""
    if isinstance(exc, TypeError):
        return Fault.BUG
    return _BY_NAME.get(type(exc).__name__, Fault.TRANSIENT)


class NvmlCalls:
    """One GPU's record of its NVML calls' answers, shared by every reader of that GPU (scalars, GPM,
    NVLink): the calls not to make again, and whether the driver went away. `failed()` applies POLICY."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.skip: set[str] = set()  # call keys not asked again (unsupported, denied, bugs)
        self.driver_gone = False  # a call said NVML lost its driver: the source must initialise again

    def failed(self, key: str, name: str, exc: BaseException, errors: list[str], recorded: list[str]) -> Fault:
        """Classify `exc` from call `name` (skipped later under `key`) and apply its policy: the name goes
        to `errors` (counted; the GPU is not ok this read) or to `recorded` (counted once; the GPU stays
        up). Unsupported is logged by the caller, which knows what is left out."""
        fault = classify(exc)
        policy = POLICY[fault]
        if not policy.ask_again:
            self.skip.add(key)
        if policy.counted:
            (recorded if policy.gpu_up else errors).append(name)
        if policy.reinit:
            self.driver_gone = True
        if fault is Fault.DENIED:
            log.warning("GPU %d: %s: no permission; omitted until restart (the exporter lacks a privilege "
                        "this call needs, see docs/operations.md)", self.index, name)
        elif fault is Fault.BUG:
            log.error("GPU %d: %s: wrong call (a bug in the exporter); not called again", self.index, key,
                      exc_info=exc)
        return fault
