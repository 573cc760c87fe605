#!/usr/bin/env python3
"""Overhead benchmark of the AzA AI Gateway.

    python3 bench/run.py                # 10 s per point, all arms
    python3 bench/run.py --quick        # 3 s per point, smoke
    python3 bench/run.py --long 100000  # plus the long run (RSS after each half)

Python only orchestrates here: the mock upstream is nginx, the load generator
is wrk (with bench/wrk/post.lua), stream timings come from curl. bench/README.md
explains every figure. Nothing here is imported by the gateway or its tests.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESPONSES = BENCH / "responses"
LUA = BENCH / "wrk" / "post.lua"
TEMPLATE = BENCH / "nginx.conf.template"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PRACTICE = "bench"
MODEL = "gpt-4o-mini"
PACE_CHUNK = 300  # bytes per paced write (about one SSE event)
PACE_RATE = 100 * 1024  # bytes/s -> one write every ~2.9 ms
BIG_CREDIT_MICRO_USD = 1_000_000 * 1_000_000  # 1,000,000 USD

TARGETS = {
    "added_p50_c1_ms": 0.5,
    "rps_c64": 3000.0,
    "added_p99_c16_ms": 10.0,
    "stream_added_ttfb_ms": 1.0,
    "peak_rss_mb": 150.0,
    "long_requests": 100_000,
}


class BenchError(RuntimeError):
    """A failure that ends the run (or an arm) with a clear message."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- processes

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


# --------------------------------------------------------------------------- /proc


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


# --------------------------------------------------------------------------- tools


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


# --------------------------------------------------------------------------- mock upstream


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


# --------------------------------------------------------------------------- bodies


def write_bodies(rundir: Path) -> dict[str, Path]:
    system = (
        "Du bist ein Assistent in einer Arztpraxis. Antworte kurz, freundlich und "
        "sachlich; gib keine Diagnosen."
    )
    user = (
        "Bitte formuliere eine kurze Nachricht an Frau Muster: die Nachkontrolle nach "
        "der Behandlung ist in zwei Wochen; sie soll die Medikamentenliste mitbringen."
    )
    base = {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": 256,
        "temperature": 0.2,
    }
    bodies = {
        "chat": base,
        "stream": {**base, "stream": True},
        "paced": {
            **base,
            "stream": True,
            "messages": [
                *base["messages"][:1],
                {"role": "user", "content": user + " BENCH_PACED_STREAM"},
            ],
        },
    }
    out = {}
    for name, body in bodies.items():
        p = rundir / f"body-{name}.json"
        p.write_text(json.dumps(body, ensure_ascii=False))
        out[name] = p
    return out


# --------------------------------------------------------------------------- load: wrk


@dataclass
class WrkResult:
    requests: int
    sent: int
    duration_s: float
    errors: dict[str, int]
    lat_us: dict[str, float]

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())


def run_wrk(
    url: str,
    body: Path,
    key: str,
    conc: int,
    seconds: float,
    core: str,
    rundir: Path,
    *,
    max_requests: int = 0,
    stop_when=None,
) -> WrkResult:
    cmd = [
        "taskset",
        "-c",
        core,
        "wrk",
        "-t1",
        f"-c{conc}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",
        "-s",
        str(LUA),
        url,
        "--",
        str(body),
        key or "-",
        str(max_requests),
        "1",
    ]
    with open(rundir / "wrk.out", "ab") as out:
        p = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=out,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        _PROCS.append(p)
        try:
            if stop_when is not None:
                # wrk only stops at the end of -d; SIGINT makes it stop early
                # and still print its summary.
                while p.poll() is None:
                    if stop_when():
                        time.sleep(0.2)
                        p.send_signal(signal.SIGINT)
                        break
                    time.sleep(0.05)
            stdout, _ = p.communicate(timeout=seconds + 120)
        finally:
            if p.poll() is None:
                stop(p)
            if p in _PROCS:
                _PROCS.remove(p)
    text = stdout.decode(errors="replace")
    (rundir / "wrk.out").open("a").write(text)
    m = re.search(r"^WRK_RESULT (\{.*\})$", text, re.M)
    if not m:
        raise BenchError(f"wrk printed no result (exit {p.returncode}):\n{text[-2000:]}")
    d = json.loads(m.group(1))
    return WrkResult(d["requests"], d["sent"], d["duration_us"] / 1e6, d["errors"], d["latency_us"])


# --------------------------------------------------------------------------- streams: curl


@dataclass
class StreamStats:
    ttfb_ms: list[float]
    ttlb_ms: list[float]
    statuses: list[str]

    def p50(self, which: str) -> float:
        return statistics.median(getattr(self, which))

    def ok(self) -> bool:
        return bool(self.statuses) and all(s.startswith("2") for s in self.statuses)


def curl_streams(url: str, body: Path, key: str, n: int, core: str, rundir: Path) -> StreamStats:
    """n POSTs in one curl invocation (one connection, reused)."""
    cfg = rundir / "curl-streams.cfg"
    block = [
        f'url = "{url}"',
        f'data-binary = "@{body}"',
        'header = "Content-Type: application/json"',
        'header = "Accept: text/event-stream"',
        *([f'header = "Authorization: Bearer {key}"'] if key else []),
        'output = "/dev/null"',
        'write-out = "%{http_code} %{time_starttransfer} %{time_total}\\n"',
        "silent",
        "no-buffer",
    ]
    cfg.write_text("\nnext\n".join("\n".join(block) for _ in range(n)) + "\n")
    r = run(["taskset", "-c", core, "curl", "-K", str(cfg)], check=False, timeout=60 + n * 5)
    st = StreamStats([], [], [])
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            st.statuses.append(parts[0])
            st.ttfb_ms.append(float(parts[1]) * 1000)
            st.ttlb_ms.append(float(parts[2]) * 1000)
    if r.returncode != 0 or len(st.statuses) != n:
        raise BenchError(
            f"curl stream run failed ({r.returncode}, {len(st.statuses)}/{n}): {r.stderr[-500:]}"
        )
    return st


def trace_reads(url: str, body: Path, key: str, rundir: Path) -> tuple[int, float]:
    """One paced stream with curl --trace-time: (body reads, first-to-last read in ms)."""
    trace = rundir / "curl-trace.txt"
    cmd = [
        "curl",
        "-s",
        "-N",
        "-o",
        "/dev/null",
        "--trace-ascii",
        str(trace),
        "--trace-time",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        f"@{body}",
        url,
    ]
    if key:
        cmd[1:1] = ["-H", f"Authorization: Bearer {key}"]
    run(cmd, check=False, timeout=60)
    stamps = []
    for m in re.finditer(rb"(\d\d):(\d\d):(\d\d\.\d+) <= Recv data", trace.read_bytes()):
        h, mi, s = int(m.group(1)), int(m.group(2)), float(m.group(3))
        stamps.append((h * 3600 + mi * 60 + s) * 1000)
    if not stamps:
        return 0, 0.0
    return len(stamps), stamps[-1] - stamps[0]


# --------------------------------------------------------------------------- databases


class Db:
    name: str
    url: str

    def events(self) -> int:
        raise NotImplementedError

    def holds(self) -> int:
        raise NotImplementedError

    def add_credit(self) -> None:
        raise NotImplementedError

    def drop(self) -> None:
        pass


class SqliteDb(Db):
    def __init__(self, path: Path) -> None:
        self.name = "sqlite"
        self.path = path
        self.url = f"sqlite:///{path}"

    def _q(self, sql: str) -> int:
        con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        try:
            return int(con.execute(sql).fetchone()[0])
        finally:
            con.close()

    def events(self) -> int:
        return self._q("SELECT COUNT(*) FROM ai_usage_events")

    def holds(self) -> int:
        return self._q("SELECT COUNT(*) FROM ai_budget_holds")

    def add_credit(self) -> None:
        con = sqlite3.connect(self.path, timeout=30)
        try:
            con.execute(
                "INSERT INTO ai_credit_ledger (practice_id, event_type, status, "
                "amount_internal_micro_usd, created_at, updated_at) VALUES (?, 'admin_adjustment', "
                "'succeeded', ?, strftime('%s','now'), strftime('%s','now'))",
                (PRACTICE, BIG_CREDIT_MICRO_USD),
            )
            con.commit()
        finally:
            con.close()


class PostgresDb(Db):
    def __init__(self, admin_url: str, dbname: str) -> None:
        self.name = "postgres"
        self.admin = admin_url.rstrip("/") + "/postgres"
        self.dbname = dbname
        self.url = admin_url.rstrip("/") + "/" + dbname
        if shutil.which("psql") is None:
            raise BenchError("psql not found (apt-get install -y postgresql-client)")
        r = run(["psql", self.admin, "-tAc", "select 1"], check=False, timeout=15)
        if r.returncode != 0:
            raise BenchError(f"PostgreSQL not reachable at {self.admin}: {r.stderr.strip()}")
        run(
            [
                "psql",
                self.admin,
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)',
            ]
        )
        run(["psql", self.admin, "-v", "ON_ERROR_STOP=1", "-c", f'CREATE DATABASE "{dbname}"'])

    def _q(self, sql: str) -> int:
        return int(run(["psql", self.url, "-tAc", sql]).stdout.strip())

    def events(self) -> int:
        return self._q("SELECT COUNT(*) FROM ai_usage_events")

    def holds(self) -> int:
        return self._q("SELECT COUNT(*) FROM ai_budget_holds")

    def add_credit(self) -> None:
        run(
            [
                "psql",
                self.url,
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                "INSERT INTO ai_credit_ledger (practice_id, event_type, status, "
                "amount_internal_micro_usd, created_at, updated_at) VALUES "
                f"('{PRACTICE}', 'admin_adjustment', 'succeeded', {BIG_CREDIT_MICRO_USD}, "
                "extract(epoch from now())::bigint, extract(epoch from now())::bigint)",
            ]
        )

    def drop(self) -> None:
        run(
            ["psql", self.admin, "-c", f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)'],
            check=False,
        )


# --------------------------------------------------------------------------- arms


@dataclass
class Point:
    conc: int
    wrk: WrkResult
    cpu_us_per_req: float | None = None
    pg_cpu_us_per_req: float | None = None
    events: int | None = None
    upstream: int | None = None
    usage_ok: bool | None = None
    usage_note: str = ""
    other_pct: float = 0.0


@dataclass
class Arm:
    name: str
    points: dict[int, Point] = field(default_factory=dict)
    streams: dict[str, StreamStats] = field(default_factory=dict)
    paced_reads: tuple[int, float] = (0, 0.0)
    failures: list[str] = field(default_factory=list)
    peak_rss_mb: float | None = None
    rss_halves_mb: tuple[float, float] | None = None
    long_rps: float | None = None
    total_requests: int = 0
    total_events: int | None = None
    total_upstream: int | None = None
    cpu_us_per_req: float | None = None
    pg_cpu_us_per_req: float | None = None
    profile_top: list[str] = field(default_factory=list)
    error: str | None = None
    max_other_pct: float = 0.0
    holds_left: int | str = "–"


class Gateway:
    def __init__(self, cmd: list[str], db: Db, mock: Mock, rundir: Path, core: str) -> None:
        self.cmd, self.db, self.mock, self.rundir, self.core = cmd, db, mock, rundir, core
        self.log = rundir / f"gateway-{db.name}.log"
        self.env = dict(os.environ)
        self.env.update(
            {
                "AZA_DATABASE_URL": db.url,
                "AZA_UPSTREAM_BASE_URL": f"{mock.base}/v1",
                "OPENAI_API_KEY": "sk-bench-upstream",
                "PYTHONUNBUFFERED": "1",
            }
        )
        for k in ("STRIPE_SECRET_KEY", "AZA_AI_AUTO_TOPUP_ENABLED"):
            self.env.pop(k, None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.key = ""

    def cli(self, *args: str) -> str:
        r = run([*self.cmd, *args], env=self.env, check=False, timeout=120)
        with open(self.log, "a") as f:
            f.write(f"$ aza-gateway {' '.join(args)}\n{r.stdout}{r.stderr}\n")
        if r.returncode != 0:
            raise BenchError(
                f"`aza-gateway {' '.join(args)}` failed ({r.returncode}):\n"
                f"{(r.stdout + r.stderr)[-1500:]}"
            )
        return r.stdout

    def prepare(self) -> None:
        self.cli("migrate")
        self.cli("license", "create", "--practice", PRACTICE, "--plan", "aza_basic_monthly")
        self.db.add_credit()
        out = self.cli("key", "create", "--practice", PRACTICE).strip().splitlines()
        if not out or not out[-1].strip():
            raise BenchError("`aza-gateway key create` printed no key")
        self.key = out[-1].strip()

    def serve(self) -> None:
        self.port = free_port()
        cmd = [
            "taskset",
            "-c",
            self.core,
            *self.cmd,
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self.proc = start(cmd, env=self.env, logfile=self.log)
        wait_ready(f"{self.base}/healthz", self.proc, self.log, f"gateway ({self.db.name})")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        assert self.proc is not None
        return children_tree(self.proc.pid)

    def smoke(self, bodies: dict[str, Path]) -> None:
        """One plain and one streamed request must work before any load."""
        for kind in ("chat", "stream"):
            req = urllib.request.Request(
                f"{self.base}/v1/chat/completions",
                data=bodies[kind].read_bytes(),
                method="POST",
                headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    text = r.read().decode(errors="replace")
                    status = r.status
            except urllib.error.HTTPError as e:
                text, status = e.read().decode(errors="replace"), e.code
            except (urllib.error.URLError, OSError) as e:
                raise BenchError(f"gateway {kind} request failed: {e}\n{tail(self.log)}") from e
            good = status == 200 and ("[DONE]" in text if kind == "stream" else '"choices"' in text)
            if not good:
                raise BenchError(
                    f"gateway answered a {kind} chat completion with HTTP {status}:\n"
                    f"{text[:1500]}\n--- gateway log ---\n{tail(self.log)}"
                )

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


def drain(mock: Mock, db: Db | None, timeout: float = 20.0) -> tuple[int, int | None]:
    """Wait until the upstream hit count and the usage event count stop moving."""
    deadline = time.monotonic() + timeout
    last = None
    stable_since = time.monotonic()
    while True:
        cur = (mock.hits(), db.events() if db else None)
        if cur != last:
            last, stable_since = cur, time.monotonic()
        elif time.monotonic() - stable_since >= 1.0:
            return cur
        if time.monotonic() > deadline:
            return cur
        time.sleep(0.1)


class Runner:
    def __init__(
        self, args: argparse.Namespace, rundir: Path, mock: Mock, bodies: dict[str, Path]
    ) -> None:
        self.a, self.rundir, self.mock, self.bodies = args, rundir, mock, bodies

    def _load(
        self,
        arm: Arm,
        url: str,
        key: str,
        conc: int,
        seconds: float,
        gw: Gateway | None,
        record: bool = True,
        **kw,
    ) -> Point:
        db = gw.db if gw else None
        pg = self.a.pg_db if db and db.name == "postgres" else None
        hits0 = self.mock.hits()
        ev0 = db.events() if db else None
        pids = gw.pids() if gw else []
        t0 = cpu_ticks(pids)
        pg0 = postgres_ticks(pg) if pg else 0
        if record and self.a.wait_idle > 0:
            pct = wait_idle(self.a.wait_idle)
            if pct >= 10:
                log(
                    f"[{arm.name}] machine still busy ({pct:.0f}% of a core) after "
                    f"{self.a.wait_idle:g} s; measuring anyway"
                )

        def mine() -> int:
            own = cpu_ticks([self.mock.proc.pid]) + children_ticks()
            return own + (postgres_background_ticks() if pg else 0)

        busy0, mine0, wall0 = busy_ticks(), mine(), time.monotonic()
        w = run_wrk(
            url, self.bodies["chat"], key, conc, seconds, self.a.client_core, self.rundir, **kw
        )
        t1 = cpu_ticks(gw.pids()) if gw else 0
        pg1 = postgres_ticks(pg) if pg else 0
        busy1, mine1, wall1 = busy_ticks(), mine(), time.monotonic()
        hits1, ev1 = drain(self.mock, db)
        pt = Point(conc, w)
        # CPU used meanwhile by processes that are not part of the benchmark
        other = (busy1 - busy0) - (mine1 - mine0) - (t1 - t0) - (pg1 - pg0)
        pt.other_pct = max(0.0, 100 * other / CLK_TCK / max(wall1 - wall0, 1e-3))
        if record:
            arm.max_other_pct = max(arm.max_other_pct, pt.other_pct)
        upstream = hits1 - hits0
        pt.upstream = upstream
        denom = max(upstream, 1)
        if gw:
            pt.cpu_us_per_req = (t1 - t0) / CLK_TCK * 1e6 / denom
            if db and db.name == "postgres":
                pt.pg_cpu_us_per_req = (pg1 - pg0) / CLK_TCK * 1e6 / denom
            pt.events = ev1 - ev0
            ok_completed = w.requests - w.errors.get("status", 0)
            problems = []
            if pt.events != upstream:
                problems.append(f"{pt.events} usage events for {upstream} upstream calls")
            if pt.events < ok_completed:
                problems.append(
                    f"{ok_completed - pt.events} completed requests without a usage event"
                )
            if pt.events > w.sent:
                problems.append(f"{pt.events - w.sent} more usage events than requests sent")
            pt.usage_ok = not problems
            pt.usage_note = "; ".join(problems)
            if problems:
                msg = (
                    f"LOST/EXTRA USAGE at c={conc}: "
                    + pt.usage_note
                    + f" (wrk: {w.requests} completed, {w.sent} sent)"
                )
                log("FAIL " + msg)
                arm.failures.append(msg)
        if w.error_total:
            msg = f"wrk errors at c={conc}: {w.errors} (non-2xx/3xx = status)"
            log("FAIL " + msg)
            arm.failures.append(msg)
        if record:
            arm.points[conc] = pt
        arm.total_requests += w.sent
        return pt

    def run_arm(self, arm: Arm, url: str, key: str, gw: Gateway | None) -> None:
        a = self.a
        chat_url = f"{url}/v1/chat/completions"
        log(f"[{arm.name}] warm-up {a.warmup:.0f} s at c=16")
        self._load(arm, chat_url, key, 16, a.warmup, gw, record=False)
        for c in a.conc:
            pt = self._load(arm, chat_url, key, c, a.seconds, gw)
            w = pt.wrk
            extra = f", {pt.cpu_us_per_req:.0f} µs CPU/req" if pt.cpu_us_per_req is not None else ""
            log(
                f"[{arm.name}] c={c}: {w.rps:,.0f} req/s, p50 {w.lat_us['p50'] / 1000:.3f} ms, "
                f"p99 {w.lat_us['p99'] / 1000:.3f} ms, errors {w.error_total}{extra}, "
                f"other processes {pt.other_pct:.0f}% of a core"
            )
        # streams (curl, sequential)
        db = gw.db if gw else None
        hits0, ev0 = self.mock.hits(), db.events() if db else None
        for kind in ("stream", "paced"):
            curl_streams(chat_url, self.bodies[kind], key, 3, a.client_core, self.rundir)  # warm
            st = curl_streams(
                chat_url, self.bodies[kind], key, a.stream_samples, a.client_core, self.rundir
            )
            if not st.ok():
                bad = [s for s in st.statuses if not s.startswith("2")]
                arm.failures.append(f"{kind} streams: {len(bad)} non-2xx answers ({bad[:3]})")
            arm.streams[kind] = st
            log(
                f"[{arm.name}] {kind}: TTFB p50 {st.p50('ttfb_ms'):.3f} ms, "
                f"TTLB p50 {st.p50('ttlb_ms'):.3f} ms"
            )
        arm.paced_reads = trace_reads(chat_url, self.bodies["paced"], key, self.rundir)
        sent = 2 * (a.stream_samples + 3) + 1
        arm.total_requests += sent
        hits1, ev1 = drain(self.mock, db)
        if db is not None and (ev1 - ev0 != hits1 - hits0 or ev1 - ev0 != sent):
            msg = (
                f"LOST/EXTRA USAGE in streams: {ev1 - ev0} usage events, "
                f"{hits1 - hits0} upstream calls, {sent} streams sent"
            )
            log("FAIL " + msg)
            arm.failures.append(msg)
        # long run
        if gw and a.long:
            self.long_run(arm, chat_url, key, gw)
        if gw and a.profile:
            self.profile(arm, chat_url, key, gw)

    def long_run(self, arm: Arm, url: str, key: str, gw: Gateway) -> None:
        half = self.a.long // 2
        rss = []
        rates = []
        for i in (1, 2):
            log(f"[{arm.name}] long run, half {i}: {half:,} requests at c={self.a.long_conc}")
            target = self.mock.hits() + half
            seen = {"hits": -1, "since": time.monotonic()}

            def reached(t: int = target, seen: dict = seen) -> bool:
                # post.lua stops sending at `half`; the last request or two may
                # never be written, so also stop once the upstream goes quiet.
                h = self.mock.hits()
                if h != seen["hits"]:
                    seen["hits"], seen["since"] = h, time.monotonic()
                return h >= t or time.monotonic() - seen["since"] > 1.5

            pt = self._load(
                arm,
                url,
                key,
                self.a.long_conc,
                3600,
                gw,
                record=False,
                max_requests=half,
                stop_when=reached,
            )
            rates.append(pt.wrk.rps)
            rss.append(proc_status_kb(server_pid(gw.proc.pid), "VmRSS") / 1024)
            log(
                f"[{arm.name}] long half {i}: {pt.wrk.requests:,} requests, "
                f"{pt.wrk.rps:,.0f} req/s, RSS {rss[-1]:.1f} MB"
            )
        arm.rss_halves_mb = (rss[0], rss[1])
        arm.long_rps = statistics.mean(rates)

    def profile(self, arm: Arm, url: str, key: str, gw: Gateway) -> None:
        if shutil.which("py-spy") is None:
            arm.profile_top = ["py-spy not installed (pip install py-spy)"]
            return
        secs = self.a.profile
        raw = self.rundir / f"pyspy-{arm.name}.txt"
        pid = server_pid(gw.proc.pid)
        log(f"[{arm.name}] py-spy record {secs} s at c=16 (not part of the table)")
        spy = start(
            [
                "taskset",
                "-c",
                self.a.client_core,
                "py-spy",
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(secs),
                "--rate",
                "200",
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(raw),
            ],
            logfile=self.rundir / "pyspy.out",
        )
        time.sleep(1.0)
        self._load(arm, url, key, 16, secs, gw, record=False)
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.wait(30)
        stop(spy)
        arm.profile_top = summarize_pyspy(raw)
        (self.a.out / f"{self.a.stamp}-pyspy-{arm.name}.txt").write_text(
            raw.read_text() if raw.exists() else ""
        )


def summarize_pyspy(raw: Path, n: int = 15) -> list[str]:
    """Top functions by own samples (like `py-spy top`), from --format raw output."""
    if not raw.exists():
        return ["(no py-spy output)"]
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, cnt = line.rpartition(" ")
        if not cnt.isdigit():
            continue
        c = int(cnt)
        samples += c
        # one row per function (line numbers dropped), as `py-spy top` groups them
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";") if f]
        if not frames:
            continue
        leaf = frames[-1]
        own[leaf] = own.get(leaf, 0) + c
        for f in set(frames):
            total[f] = total.get(f, 0) + c
    if not samples:
        return ["(no samples)"]
    rows = [f"{'%own':>6} {'%total':>7}  function (file:line)"]
    for f, c in sorted(own.items(), key=lambda kv: -kv[1])[:n]:
        rows.append(f"{100 * c / samples:6.1f} {100 * total[f] / samples:7.1f}  {shorten(f)}")
    return rows


def shorten(frame: str) -> str:
    frame = re.sub(r"/[^ (]*/site-packages/", "", frame)
    frame = re.sub(r"/[^ (]*/lib/python3\.\d+/", "", frame)
    return frame.replace(str(BENCH.parent) + "/", "")


# --------------------------------------------------------------------------- report


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def status(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def report(
    args: argparse.Namespace,
    arms: list[Arm],
    vers: dict[str, str],
    mach: dict[str, str],
    paced_direct: tuple[int, float],
) -> tuple[str, bool]:
    direct = next((a for a in arms if a.name == "direct"), None)
    L: list[str] = []
    now = dt.datetime.now().astimezone()
    L.append(f"# AzA gateway overhead benchmark — {now:%Y-%m-%d %H:%M %Z} on {mach['host']}")
    L.append("")
    L.append(
        f"Command: `{' '.join(['python3', 'bench/run.py', *sys.argv[1:]])}` — "
        f"{args.seconds:g} s per point, warm-up {args.warmup:g} s, "
        f"{args.stream_samples} stream samples per kind."
    )
    L.append(f"Machine: {mach['cpu']}, {mach['cores']} cores, Linux {mach['kernel']}.")
    L.append(
        f"Pinning: gateway (one uvicorn worker) `taskset -c {args.gateway_core}`; wrk, curl and "
        f"the nginx mock `taskset -c {args.client_core}`; PostgreSQL not pinned (its CPU is "
        "shown separately)."
    )
    L.append("Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".")
    noise = ", ".join(f"{a.name} {a.max_other_pct:.0f}%" for a in arms if not a.error)
    L.append(
        f"Other processes on the machine (not the benchmark's) used at most, during one point: "
        f"{noise} of one core."
        + (
            " **The machine was busy: these figures are noisy.**"
            if any(a.max_other_pct > 10 for a in arms)
            else ""
        )
    )
    L.append("")
    L.append(
        "| arm | c | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | gateway CPU µs/req "
        "| PG CPU µs/req | errors | usage events / upstream calls |"
    )
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for arm in arms:
        if arm.error:
            L.append(
                f"| {arm.name} |" + " – |" * 9 + f" NOT RUN: {arm.error.splitlines()[0][:120]} |"
            )
            continue
        for c, pt in arm.points.items():
            w = pt.wrk
            dp = direct.points.get(c) if direct and arm is not direct else None
            add50 = (w.lat_us["p50"] - dp.wrk.lat_us["p50"]) / 1000 if dp else None
            add99 = (w.lat_us["p99"] - dp.wrk.lat_us["p99"]) / 1000 if dp else None
            if pt.usage_ok is None:
                usage = "–"
            else:
                usage = f"{pt.events:,} / {pt.upstream:,} " + ("ok" if pt.usage_ok else "**FAIL**")
            L.append(
                f"| {arm.name} | {c} | {w.rps:,.0f} | {w.lat_us['p50'] / 1000:.3f} | "
                f"{w.lat_us['p99'] / 1000:.3f} | {fmt(add50)} | {fmt(add99)} | "
                f"{fmt(pt.cpu_us_per_req, ',.0f')} | {fmt(pt.pg_cpu_us_per_req, ',.0f')} | "
                f"{w.error_total or 0}{'' if not w.error_total else ' **FAIL**'} | {usage} |"
            )
    L.append("")
    L.append("Streams (curl, sequential, one connection; TTFB = first response byte, TTLB = last):")
    L.append("")
    L.append("| arm | stream | TTFB p50 ms | TTLB p50 ms | added TTFB ms | added TTLB ms |")
    L.append("|---|---|---:|---:|---:|---:|")
    for arm in arms:
        for kind, st in arm.streams.items():
            ds = direct.streams.get(kind) if direct and arm is not direct else None
            at = st.p50("ttfb_ms") - ds.p50("ttfb_ms") if ds else None
            al = st.p50("ttlb_ms") - ds.p50("ttlb_ms") if ds else None
            label = f"paced (~{PACE_CHUNK / PACE_RATE * 1000:.1f} ms/chunk)"
            if kind != "paced":
                label = "full speed"
            L.append(
                f"| {arm.name} | {label} | "
                f"{st.p50('ttfb_ms'):.3f} | {st.p50('ttlb_ms'):.3f} | {fmt(at)} | {fmt(al)} |"
            )
    L.append("")
    L.append(
        "Paced stream, one request traced with `curl --trace-time` (body reads, first→last): "
        + "; ".join(
            f"{a.name} {a.paced_reads[0]} reads over {a.paced_reads[1]:.1f} ms"
            for a in arms
            if a.streams
        )
        + "."
    )
    L.append("")
    gws = [a for a in arms if a.name != "direct" and not a.error]
    all_ok = True
    if gws:
        L.append(
            "| gateway arm | requests sent | peak RSS (VmHWM) MB | RSS after long-run halves MB "
            "| CPU µs/req (whole run) | usage events / upstream calls (whole run) "
            "| holds left | result |"
        )
        L.append("|---|---:|---:|---:|---:|---|---:|---|")
        for a in gws:
            halves = (
                f"{a.rss_halves_mb[0]:.1f} / {a.rss_halves_mb[1]:.1f}" if a.rss_halves_mb else "–"
            )
            res = "ok" if not a.failures else "**FAIL**"
            all_ok &= not a.failures
            L.append(
                f"| {a.name} | {a.total_requests:,} | {fmt(a.peak_rss_mb, '.1f')} | {halves} | "
                f"{fmt(a.cpu_us_per_req, ',.0f')} | {a.total_events} / {a.total_upstream} | "
                f"{a.holds_left} | {res} |"
            )
        L.append("")
        L.append("Targets (figures, not asserted anywhere):")
        L.append("")
        L.append("| target | " + " | ".join(a.name for a in gws) + " |")
        L.append("|---|" + "---|" * len(gws))

        def row(label: str, fn) -> None:
            L.append(f"| {label} | " + " | ".join(fn(a) for a in gws) + " |")

        def added(a: Arm, c: int, q: str) -> float | None:
            if not direct or c not in a.points or c not in direct.points:
                return None
            return (a.points[c].wrk.lat_us[q] - direct.points[c].wrk.lat_us[q]) / 1000

        def t_added(a: Arm, c: int, q: str, lim: float) -> str:
            v = added(a, c, q)
            return "n/a" if v is None else f"{status(v <= lim)} {v:.3f} ms"

        row(
            f"added p50 at c=1 ≤ {TARGETS['added_p50_c1_ms']} ms",
            lambda a: t_added(a, 1, "p50", TARGETS["added_p50_c1_ms"]),
        )
        row(
            f"req/s at c=64 ≥ {TARGETS['rps_c64']:.0f}",
            lambda a: (
                "n/a"
                if 64 not in a.points
                else f"{status(a.points[64].wrk.rps >= TARGETS['rps_c64'])} "
                f"{a.points[64].wrk.rps:,.0f}"
            ),
        )
        row(
            f"added p99 at c=16 ≤ {TARGETS['added_p99_c16_ms']} ms",
            lambda a: t_added(a, 16, "p99", TARGETS["added_p99_c16_ms"]),
        )

        def t_ttfb(a: Arm) -> str:
            if not direct or "stream" not in a.streams or "stream" not in direct.streams:
                return "n/a"
            v = a.streams["stream"].p50("ttfb_ms") - direct.streams["stream"].p50("ttfb_ms")
            return f"{status(v <= TARGETS['stream_added_ttfb_ms'])} {v:.3f} ms"

        row(f"streams added TTFB ≤ {TARGETS['stream_added_ttfb_ms']} ms", t_ttfb)

        def t_paced(a: Arm) -> str:
            if not direct or "paced" not in a.streams or "paced" not in direct.streams:
                return "n/a"
            d = direct.streams["paced"]
            span = d.p50("ttlb_ms") - d.p50("ttfb_ms")
            v = a.streams["paced"].p50("ttfb_ms") - d.p50("ttfb_ms")
            verdict = "PASS" if v < span / 2 else "**FAIL** (buffered?)"
            return f"{verdict} first byte +{v:.1f} ms of a {span:.0f} ms stream"

        row("paced stream forwarded as it arrives", t_paced)

        def t_rss(a: Arm) -> str:
            if a.peak_rss_mb is None:
                return "n/a"
            note = (
                ""
                if a.total_requests >= TARGETS["long_requests"]
                else f" (after {a.total_requests:,} requests; `--long 100000` for the target)"
            )
            return f"{status(a.peak_rss_mb <= TARGETS['peak_rss_mb'])} {a.peak_rss_mb:.1f} MB{note}"

        row(f"peak RSS ≤ {TARGETS['peak_rss_mb']:.0f} MB after 100k requests", t_rss)
        L.append("")
    for a in arms:
        if a.error:
            all_ok = False
        for f in a.failures:
            L.append(f"- **FAIL** [{a.name}] {f}")
        if a.error:
            L.append(f"- **FAIL** [{a.name}] not run: {a.error}")
        if a.profile_top:
            L.append("")
            L.append(
                f"py-spy, {a.name} gateway at c=16 ({args.profile} s, top 15 functions by own "
                f"samples; collapsed stacks in {args.stamp}-pyspy-{a.name}.txt):"
            )
            L.append("")
            L.append("```")
            L.extend(a.profile_top)
            L.append("```")
    L.append("")
    L.append(
        "**RESULT: "
        + (
            "OK — no errors, one usage event per upstream call**"
            if all_ok
            else "FAIL — errors or lost usage: these figures are not a result**"
        )
    )
    return "\n".join(L) + "\n", all_ok


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--seconds", type=float, default=10.0, help="wrk duration per point (default 10)"
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 3 s per point, fewer stream samples"
    )
    p.add_argument("--concurrency", default="1,16,64", help="comma list (default 1,16,64)")
    p.add_argument(
        "--arms",
        default="direct,sqlite,postgres",
        help="comma list of direct, sqlite, postgres (default all)",
    )
    p.add_argument(
        "--pg-url",
        default=os.environ.get("AZA_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432"),
        help="PostgreSQL server, without database (default postgresql://postgres@127.0.0.1:5432)",
    )
    p.add_argument(
        "--pg-db", default="aza_bench", help="database created afresh for the run (dropped after)"
    )
    p.add_argument(
        "--long",
        type=int,
        default=0,
        metavar="N",
        help="also send N requests per gateway arm, RSS recorded after each half",
    )
    p.add_argument("--long-concurrency", dest="long_conc", type=int, default=16)
    p.add_argument("--stream-samples", type=int, default=50)
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of c=16 load before each arm")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="S",
        help="after the points, py-spy record each gateway S seconds at c=16",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=30.0,
        metavar="S",
        help="before each point wait up to S s for other processes to go quiet (0: don't)",
    )
    p.add_argument("--gateway", default="aza-gateway", help="gateway command (default aza-gateway)")
    p.add_argument("--gateway-core", default="0")
    p.add_argument("--client-core", default="1")
    p.add_argument("--no-install", action="store_true", help="never apt-get install missing tools")
    p.add_argument(
        "--check-mock", action="store_true", help="only start the mock and show its pacing"
    )
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs, databases)")
    p.add_argument("--out", type=Path, default=BENCH / "results")
    a = p.parse_args(argv)
    if a.quick:
        a.seconds = min(a.seconds, 3.0)
        a.stream_samples = min(a.stream_samples, 20)
        a.warmup = min(a.warmup, 1.0)
    a.conc = [int(c) for c in a.concurrency.split(",") if c.strip()]
    a.arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    bad = set(a.arms) - {"direct", "sqlite", "postgres"}
    if bad:
        p.error(f"unknown arms: {', '.join(sorted(bad))}")
    return a


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    rundir = Path(tempfile.mkdtemp(prefix="aza-bench-"))
    a.out.mkdir(parents=True, exist_ok=True)
    mach = machine()
    a.stamp = f"{dt.datetime.now():%Y-%m-%d-%H%M}-{mach['host']}"
    arms: list[Arm] = []
    ok = False
    try:
        ensure_tools(a.no_install)
        if (os.cpu_count() or 1) < 2:
            raise BenchError("needs two cores (gateway on one, load generator on the other)")
        gw_cmd, gw_python = (None, sys.executable)
        if any(x != "direct" for x in a.arms) and not a.check_mock:
            gw_cmd, gw_python = resolve_gateway(a.gateway)
        vers = versions(gw_python, a.pg_url if "postgres" in a.arms else None)
        log(f"run directory {rundir}")
        mock = start_mock(rundir, a.client_core)
        bodies = write_bodies(rundir)
        log(f"mock upstream (nginx) on {mock.base}")
        paced = trace_reads(f"{mock.base}/v1/chat/completions", bodies["paced"], "", rundir)
        log(f"mock paced stream: {paced[0]} reads over {paced[1]:.1f} ms")
        if a.check_mock:
            for kind in ("stream", "paced"):
                st = curl_streams(
                    f"{mock.base}/v1/chat/completions", bodies[kind], "", 20, a.client_core, rundir
                )
                log(
                    f"mock {kind}: TTFB p50 {st.p50('ttfb_ms'):.3f} ms, "
                    f"TTLB p50 {st.p50('ttlb_ms'):.3f} ms"
                )
            return 0
        runner = Runner(a, rundir, mock, bodies)
        for name in a.arms:
            arm = Arm(name)
            arms.append(arm)
            if name == "direct":
                runner.run_arm(arm, mock.base, "", None)
                continue
            gw = None
            db: Db | None = None
            try:
                db = (
                    SqliteDb(rundir / "aza-bench.sqlite")
                    if name == "sqlite"
                    else PostgresDb(a.pg_url, a.pg_db)
                )
                assert gw_cmd is not None
                gw = Gateway(gw_cmd, db, mock, rundir, a.gateway_core)
                log(f"[{name}] preparing database ({db.url})")
                gw.prepare()
                gw.serve()
                log(f"[{name}] gateway pid {gw.proc.pid} on {gw.base}")
                ev0, hits0 = 0, mock.hits()
                gw.smoke(bodies)
                arm.total_requests += 2
                cpu0 = cpu_ticks(gw.pids())
                pg0 = postgres_ticks(a.pg_db) if name == "postgres" else 0
                runner.run_arm(arm, gw.base, gw.key, gw)
                hits1, ev1 = drain(mock, db)
                arm.total_upstream, arm.total_events = hits1 - hits0, ev1 - ev0
                if arm.total_events != arm.total_upstream:
                    arm.failures.append(
                        f"whole run: {arm.total_events} usage events for "
                        f"{arm.total_upstream} upstream calls"
                    )
                arm.cpu_us_per_req = (
                    (cpu_ticks(gw.pids()) - cpu0) / CLK_TCK * 1e6 / max(arm.total_upstream, 1)
                )
                if name == "postgres":
                    arm.pg_cpu_us_per_req = (
                        (postgres_ticks(a.pg_db) - pg0) / CLK_TCK * 1e6 / max(arm.total_upstream, 1)
                    )
                arm.peak_rss_mb = proc_status_kb(server_pid(gw.proc.pid), "VmHWM") / 1024
                arm.holds_left = db.holds()
                if arm.holds_left:
                    arm.failures.append(f"{arm.holds_left} budget holds left after the run")
            except BenchError as e:
                arm.error = str(e)
                log(f"FAIL [{name}] {e}")
            finally:
                if gw:
                    gw.stop()
                if db and not a.keep:
                    db.drop()
        vers_line = vers
        text, ok = report(a, arms, vers_line, mach, paced)
        out = a.out / f"{a.stamp}.md"
        out.write_text(text)
        print()
        print(text)
        shown = out.relative_to(BENCH.parent) if out.is_relative_to(BENCH.parent) else out
        log(f"written to {shown}")
    except BenchError as e:
        log(f"FAIL {e}")
        return 2
    finally:
        stop_all()
        if a.keep:
            log(f"kept {rundir}")
        else:
            shutil.rmtree(rundir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
