# gpu-telemetry-exporter image: build a wheel, install it into a slim runtime with no compilers.
# Build: docker build -t gpu-telemetry-exporter:0.1.0 .
FROM python:3.12.7-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12.7-slim-bookworm
# The NVIDIA container runtime injects libnvidia-ml and the device nodes when these are set.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=utility \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
# Byte-code is compiled here, at build time, so a read-only root filesystem costs nothing at start.
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 65534:65534
EXPOSE 9445
# No curl in the image: the exporter checks its own /healthz (honours GPU_EXPORTER_WEB_LISTEN_ADDRESS, and
# GPU_EXPORTER_WEB_CONFIG_FILE for HTTPS).
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-m", "exporter.healthcheck"]
ENTRYPOINT ["gpu-telemetry-exporter"]
