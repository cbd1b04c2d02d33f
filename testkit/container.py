"""podman for the image tests (tests/test_container.py): an engine configured for this kind of machine, a
local stand-in for the Dockerfile's python base, the machine's pip configuration for the build, and the
README's sidecar lines.

- containers.conf: crun refuses a hybrid cgroup v1/v2 layout, and podman's default rlimits exceed what a
  process without CAP_SYS_RESOURCE may set, so runc, cgroupfs and modest ulimits; passed with
  CONTAINERS_CONF, the machine's own configuration is left alone.
- The base: no image registry is reachable, so `python:*-slim` is replaced by Debian bookworm's python3
  and pip (mmdebstrap, ~40 s) imported as an image. The tarball and the image are a cache, keyed by the
  recipe and rebuilt after BASE_MAX_AGE_S; everything else a test makes it removes.
"""
from __future__ import annotations

import ast
import configparser
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=1000:1000"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""
BASE_SUITE = "bookworm"  # python:3.12.7-slim-bookworm's Debian release
BASE_PACKAGES = ("python3", "python3-pip", "python-is-python3", "ca-certificates")
# Debian marks its python "externally managed" (PEP 668); the official python images do not.
BASE_HOOK = 'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED'
BASE_MAX_AGE_S = 30 * 86400  # Debian's security updates reach the cached base at least this often
BASE_REPO = "localhost/gte-python-standin"


class EngineError(RuntimeError):
    """The engine cannot run here; the message is one line that says why."""


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


class Podman:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise EngineError(f"podman {' '.join(args[:3])} ...: exit {r.returncode}: {_first_line(r.stderr)}")
        return r

    def bash(self, script: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run shell lines (the README's) with `podman` on PATH and this configuration."""
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=self.env, capture_output=True, text=True,
                           timeout=timeout, cwd=cwd)
        if r.returncode != 0:
            raise EngineError(f"exit {r.returncode}: {_first_line(r.stderr)}\n--- script:\n{script}\n--- stderr:\n"
                              f"{r.stderr[-3000:]}")
        return r

    def check_usable(self) -> None:
        """EngineError (one line) where podman is missing or cannot run a container at all."""
        for tool in ("podman", "runc", "mmdebstrap"):
            if shutil.which(tool) is None:
                raise EngineError(f"{tool} not found (tests/run.sh installs podman runc mmdebstrap uidmap)")
        self("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=60)

    def dangling_images(self) -> set[str]:
        """The ids of the untagged images now present."""
        return set(self("images", "-a", "-q", "--no-trunc", "--filter", "dangling=true").stdout.split())


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpu-telemetry-exporter"


def base_image(podman: Podman) -> tuple[str, dict[str, float]]:
    """The stand-in base image's name, made or refreshed when needed; and seconds spent per step."""
    recipe = repr((BASE_SUITE, BASE_PACKAGES, BASE_HOOK))
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    tag = f"{BASE_REPO}:{key}"
    tarball = cache_dir() / f"base-{BASE_SUITE}-{key}.tar"
    spent: dict[str, float] = {}
    fresh = tarball.exists() and time.time() - tarball.stat().st_mtime < BASE_MAX_AGE_S
    if fresh and podman("image", "exists", tag, check=False).returncode == 0:
        return tag, spent
    if not fresh:
        tarball.parent.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_name(f"{tarball.stem}.{os.getpid()}.partial")  # two runs at once write apart
        t0 = time.monotonic()
        r = subprocess.run(["mmdebstrap", "--quiet", "--format=tar", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
                            f"--customize-hook={BASE_HOOK}", BASE_SUITE, str(partial)],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            partial.unlink(missing_ok=True)
            raise EngineError(f"mmdebstrap {BASE_SUITE}: exit {r.returncode}: {_first_line(r.stderr)}")
        os.replace(partial, tarball)
        spent["mmdebstrap"] = time.monotonic() - t0
        podman("rmi", "--force", tag, check=False)  # the image made from the stale tarball
    t0 = time.monotonic()
    podman("import", "--change", 'CMD ["python3"]', str(tarball), tag, timeout=300)
    spent["import"] = time.monotonic() - t0
    return tag, spent


def pip_build_args(workdir: Path) -> list[str]:
    """`podman build` arguments that give pip in the build this machine's pip configuration.

    `pip config list` gathers the configuration files and PIP_* variables; they are written as one
    /etc/pip.conf mounted read-only, and every absolute path a value names (the CA bundle, a constraints
    file, find-links; a local index's parent) is mounted read-only where it is."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}).stdout
    files: dict[tuple[str, str], str] = {}
    from_env: dict[tuple[str, str], str] = {}
    for line in out.splitlines():
        m = re.fullmatch(r"([^=]+)\.([^.=]+)=(.*)", line.strip())
        if not m:
            continue
        section, name, value = m.groups()
        try:
            value = str(ast.literal_eval(value))
        except (ValueError, SyntaxError):
            pass
        if section == ":env:":
            from_env[("global", name)] = value
        else:
            files[(section, name)] = value
    config = configparser.ConfigParser(interpolation=None)
    mounts: dict[str, str] = {}  # where it is mounted -> what is mounted there
    for (section, name), value in {**files, **from_env}.items():  # the environment wins, as in pip
        if not config.has_section(section):
            config.add_section(section)
        config.set(section, name, value)
        for word in value.split():
            path = word.removeprefix("file://")
            if name.endswith("index-url") and word.startswith("file://"):
                path = os.path.dirname(path.rstrip("/"))  # a local index's pages link to ../files/ beside it
            if path.startswith("/") and os.path.exists(path):
                mounts[path] = os.path.realpath(path)
    conf = workdir / "pip.conf"
    with conf.open("w") as f:
        config.write(f)
    args = ["--volume", f"{conf}:/etc/pip.conf:ro"]
    for path, source in sorted(mounts.items()):
        args += ["--volume", f"{source}:{path}:ro"]
    return args


def readme_commands(readme: Path, heading: str = "## Sidecar beside ChatTTS") -> list[str]:
    """The shell commands of the first ```sh block after `heading`: continuation lines joined, comments
    dropped."""
    text = readme.read_text()
    start = text.index(heading)
    m = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    if m is None:
        raise ValueError(f"no ```sh block after {heading!r} in {readme}")
    joined = m.group(1).replace("\\\n", " ")
    return [" ".join(line.split()) for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def readme_snippet(readme: Path, contains: str) -> str:
    """The one inline `code` span of the README that contains `contains`."""
    spans = [s for s in re.findall(r"`([^`\n]+)`", readme.read_text()) if contains in s]
    if len(spans) != 1:
        raise ValueError(f"want one `...` span with {contains!r} in {readme}, found {len(spans)}")
    return spans[0]


def replace_once(text: str, old: str, new: str) -> str:
    """text with `old` replaced; ValueError unless it occurs exactly once (the README changed)."""
    n = text.count(old)
    if n != 1:
        raise ValueError(f"{old!r} occurs {n} times in {text!r}")
    return text.replace(old, new)
