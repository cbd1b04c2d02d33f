"""NVML source: the per-GPU reader, the XID event watcher, the blocking PCIe fallback, and the scalar
metric specs that drive both the reads and the rendering. The sampler uses NvmlSource only."""
from exporter.sources.nvml.reader import GpuReader
from exporter.sources.nvml.readings import GpuIdentity, GpuProcess, GpuReading, MigReading, NvmlStatus
from exporter.sources.nvml.source import NvmlSource

__all__ = ["GpuIdentity", "GpuProcess", "GpuReader", "GpuReading", "MigReading", "NvmlSource", "NvmlStatus"]
