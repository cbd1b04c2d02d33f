# gpu-telemetry-exporter image: build a wheel, install it into a slim runtime with no compilers.
# Build: docker build -t gpu-telemetry-exporter:0.1.0 .
# PYTHON_IMAGE: any Debian-based image with `python` and `pip` on PATH (tests/test_container.py builds on a
# local stand-in, made with mmdebstrap, where no registry is reachable).
ARG PYTHON_IMAGE=python:3.12.7-slim-bookworm
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
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
