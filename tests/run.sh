#!/usr/bin/env bash
# The whole test suite from a fresh machine: installs what it needs (Debian packages when missing,
# Python deps in .venv), type-checks exporter/ with mypy (settings in pyproject.toml), then runs pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "tests/run.sh: installing Debian packages: $*" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v prometheus-node-exporter >/dev/null || missing+=(prometheus-node-exporter)
command -v chromium >/dev/null || missing+=(chromium)
command -v openssl >/dev/null || missing+=(openssl)  # certificates for the TLS tests
# gcc and libc headers build the C stand-in for libnvidia-ml.so.1 (testkit/nvml_stub) that real pynvml loads
command -v gcc >/dev/null || missing+=(gcc)
[ -e /usr/include/stdio.h ] || missing+=(libc6-dev)
command -v unshare >/dev/null || missing+=(util-linux)  # a 64 MiB tmpfs as /dev/shm for the diagnosis tests
# tests/test_container.py: podman builds the Dockerfile and runs the README's sidecar lines; runc (crun
# refuses hybrid cgroup layouts), uidmap for podman, mmdebstrap for a local base image (no registry here)
for tool in podman runc mmdebstrap; do command -v $tool >/dev/null || missing+=($tool); done
command -v newuidmap >/dev/null || missing+=(uidmap)
if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi

if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest "$@"
