"""Processes this run starts, and what /proc says of their CPU and memory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from benchkit.common import CLK_TCK, BenchError

_PROCS: list[subprocess.Popen[bytes]] = []


def start(
    cmd: list[str], *, env: dict[str, str] | None = None, logfile: Path
) -> subprocess.Popen[bytes]:
    """Start a process in its own session (so its whole group can be stopped)."""
    out = open(logfile, "ab")  # noqa: SIM115 - closed with the process
    p = subprocess.Popen(
        cmd,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    out.close()
    _PROCS.append(p)
    return p


def stop(p: subprocess.Popen[bytes], timeout: float = 8.0) -> None:
    """Stop a process this script started, and its process group."""
    if p.poll() is None:
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 3.0)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
    if p in _PROCS:
        _PROCS.remove(p)


def stop_all() -> None:
    for p in list(reversed(_PROCS)):
        stop(p)


def _on_signal(signum: int, _frame: object) -> None:
    stop_all()
    raise SystemExit(128 + signum)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(
    cmd: list[str], *, env: dict[str, str] | None = None, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise BenchError(
            f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
        )
    return r


def children_tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    parents: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12])  # utime, stime (fields 14, 15)
    return total


def postgres_pids(wanted: Callable[[str], bool]) -> list[int]:
    """PostgreSQL server processes whose process title (`postgres: ...`) `wanted` accepts."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                title = (
                    Path(f"/proc/{d}/cmdline")
                    .read_bytes()
                    .replace(b"\0", b" ")
                    .decode(errors="replace")
                )
            except OSError:
                continue
            if title.startswith("postgres:") and wanted(title):
                pids.append(int(d))
    return pids


def postgres_ticks(dbname: str) -> int:
    """CPU of the PostgreSQL backends connected to the bench database."""
    return cpu_ticks(postgres_pids(lambda title: f" {dbname} " in title))


def postgres_background_ticks() -> int:
    """CPU of PostgreSQL's own background processes (WAL writer, checkpointer, ...)."""
    return cpu_ticks(postgres_pids(lambda title: "(" not in title))


def wait_idle(limit_s: float) -> float:
    """Wait (at most limit_s) until the machine is quiet: <10% of a core busy over 0.5 s.
    Other people's test runs on a shared machine would otherwise skew a point.
    Returns the busy percentage last seen."""
    deadline = time.monotonic() + limit_s
    while True:
        b0, t0 = busy_ticks(), time.monotonic()
        time.sleep(0.5)
        pct = 100 * (busy_ticks() - b0) / CLK_TCK / (time.monotonic() - t0)
        if pct < 10 or time.monotonic() >= deadline:
            return pct


def busy_ticks() -> int:
    """CPU time spent by the whole machine (all cores), not idle."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(f[:8]) - f[3] - f[4]  # user..steal, less idle and iowait


def children_ticks() -> int:
    """CPU of this script's finished children (wrk, curl, psql)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return round((r.ru_utime + r.ru_stime) * CLK_TCK)


def proc_status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def server_pid(root: int) -> int:
    """The process of the tree with the largest RSS: the uvicorn server."""
    return max(children_tree(root), key=lambda p: proc_status_kb(p, "VmRSS"))
