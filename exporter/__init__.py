"""gpu-telemetry-exporter: sub-scrape GPU and host sampling for Prometheus."""

from exporter import promlazy

__version__ = "0.1.0"

promlazy.install()  # before any prometheus_client import: see promlazy.py
