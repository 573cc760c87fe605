"""The tools a run needs (installed where missing) and the versions it reports."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import sys
from pathlib import Path

from benchkit.common import BenchError, log
from benchkit.procs import run


def ensure_tools(skip_install: bool) -> None:
    missing = [t for t in ("nginx", "wrk", "curl", "taskset") if shutil.which(t) is None]
    if not missing:
        return
    pkgs = {"nginx": "nginx-light", "wrk": "wrk", "curl": "curl", "taskset": "util-linux"}
    if skip_install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError(
            f"missing tools: {', '.join(missing)}; install them with "
            f"`apt-get install -y {' '.join(pkgs[m] for m in missing)}`"
        )
    log(f"installing {', '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = run(
        ["apt-get", "install", "-y", *[pkgs[m] for m in missing]], env=env, check=False, timeout=600
    )
    if r.returncode != 0:
        run(["apt-get", "update"], env=env, timeout=600)
        run(["apt-get", "install", "-y", *[pkgs[m] for m in missing]], env=env, timeout=600)


def resolve_gateway(cmd: str) -> tuple[list[str], str]:
    """The gateway's command (past any pyenv shim) and the Python it runs on."""
    path = shutil.which(cmd)
    if path is None:
        raise BenchError(
            f"`{cmd}` is not installed: run `pip install -e .` in the repository first"
        )
    if "/shims/" in path and shutil.which("pyenv"):
        r = run(["pyenv", "which", Path(path).name], check=False)
        if r.returncode == 0 and r.stdout.strip():
            path = r.stdout.strip()
    python = sys.executable
    try:
        first = Path(path).read_bytes()[:300].split(b"\n", 1)[0].decode()
        if first.startswith("#!"):
            cand = first[2:].strip().split()[0]
            if Path(cand).exists() and "python" in Path(cand).name:
                python = cand
    except (OSError, UnicodeDecodeError):
        pass
    return [path], python


def versions(gw_python: str, pg_admin_url: str | None) -> dict[str, str]:
    v: dict[str, str] = {}
    code = (
        "import json, sys, sqlite3, importlib.metadata as m\n"
        "out = {'python': sys.version.split()[0], 'sqlite': sqlite3.sqlite_version}\n"
        "for n in ('uvicorn', 'httpx', 'starlette', 'uvloop', 'httptools',\n"
        "          'asyncpg', 'aza-gateway'):\n"
        "    try: out[n] = m.version(n)\n"
        "    except Exception: out[n] = 'not installed'\n"
        "print(json.dumps(out))\n"
    )
    r = run([gw_python, "-c", code], check=False)
    if r.returncode == 0:
        v.update(json.loads(r.stdout))
    r = run(["nginx", "-v"], check=False)
    v["nginx"] = (r.stderr or r.stdout).strip().split("/")[-1]
    r = run(["wrk", "-v"], check=False)
    m = re.search(r"wrk (\S+)", r.stdout + r.stderr)
    v["wrk"] = m.group(1) if m else "?"
    r = run(["curl", "--version"], check=False)
    v["curl"] = r.stdout.split()[1] if r.stdout else "?"
    if pg_admin_url:
        r = run(["psql", pg_admin_url, "-tAc", "show server_version"], check=False)
        v["postgres"] = r.stdout.strip() if r.returncode == 0 else "unreachable"
    return v


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": socket.gethostname(),
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
    }
