"""gpu-telemetry-exporter: sub-scrape GPU and host sampling for Prometheus."""

__version__ = "0.1.0"
