"""The mock upstream: nginx serving canned OpenAI answers."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchkit.common import PACE_CHUNK, PACE_RATE, RESPONSES, TEMPLATE, BenchError
from benchkit.procs import free_port, start


@dataclass
class Mock:
    proc: subprocess.Popen[bytes]
    port: int
    hits_log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hits(self) -> int:
        try:
            with open(self.hits_log, "rb") as f:
                return sum(1 for _ in f)
        except OSError:
            return 0


def start_mock(rundir: Path, core: str) -> Mock:
    port = free_port()
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (rundir / "nginx-tmp" / d).mkdir(parents=True, exist_ok=True)
    conf = TEMPLATE.read_text()
    for k, val in {
        "RUNDIR": str(rundir),
        "PORT": str(port),
        "RESPONSES": str(RESPONSES),
        "PACE_CHUNK": str(PACE_CHUNK),
        "PACE_RATE": str(PACE_RATE),
        "PACE_MS": f"{PACE_CHUNK / PACE_RATE * 1000:.1f}",
    }.items():
        conf = conf.replace(f"@{k}@", val)
    (rundir / "nginx.conf").write_text(conf)
    cmd = ["taskset", "-c", core, "nginx", "-p", str(rundir), "-c", str(rundir / "nginx.conf")]
    proc = start(cmd, logfile=rundir / "nginx.out")
    mock = Mock(proc, port, rundir / "nginx-hits.log")
    wait_ready(f"{mock.base}/healthz", proc, rundir / "nginx-error.log", "mock upstream (nginx)")
    return mock


def wait_ready(
    url: str, proc: subprocess.Popen[bytes], logfile: Path, what: str, timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(
                f"{what} exited with {proc.returncode} before it was ready:\n{tail(logfile)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise BenchError(f"{what} not ready after {timeout:.0f} s ({url}):\n{tail(logfile)}")


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"
