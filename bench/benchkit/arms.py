"""The arms of a run: the gateway under test and the runner that measures each point."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from benchkit.common import BENCH, CLK_TCK, PRACTICE, BenchError, log
from benchkit.dbs import Db
from benchkit.load import StreamStats, WrkResult, curl_streams, run_wrk, trace_reads
from benchkit.mock import Mock, tail, wait_ready
from benchkit.procs import (
    busy_ticks,
    children_ticks,
    children_tree,
    cpu_ticks,
    free_port,
    postgres_background_ticks,
    postgres_ticks,
    proc_status_kb,
    run,
    server_pid,
    start,
    stop,
    wait_idle,
)


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

    def prepare(self, *, key_limits: bool = False) -> None:
        self.cli("migrate")
        self.cli("license", "create", "--practice", PRACTICE, "--plan", "aza_basic_monthly")
        self.db.add_credit()
        out = self.cli("key", "create", "--practice", PRACTICE).strip().splitlines()
        if not out or not out[-1].strip():
            raise BenchError("`aza-gateway key create` printed no key")
        self.key = out[-1].strip()
        if key_limits:
            # Limits far above what the run sends (issue 18): the gate's limit path is
            # measured (cap holds, rate windows), never a refusal.
            self.cli(
                "key",
                "limits",
                self.key[:10],
                "--monthly-cap-usd",
                "1000000",
                "--requests-per-minute",
                "1000000000",
                "--tokens-per-minute",
                "1000000000",
            )

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
