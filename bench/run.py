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
import datetime as dt
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from benchkit.arms import Arm, Gateway, Runner, drain
from benchkit.common import BENCH, CLK_TCK, BenchError, log
from benchkit.dbs import Db, PostgresDb, SqliteDb
from benchkit.load import curl_streams, trace_reads, write_bodies
from benchkit.mock import start_mock
from benchkit.procs import (
    _on_signal,
    cpu_ticks,
    postgres_ticks,
    proc_status_kb,
    server_pid,
    stop_all,
)
from benchkit.report import report
from benchkit.tools import ensure_tools, machine, resolve_gateway, versions


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
    p.add_argument(
        "--key-limits",
        action="store_true",
        help="give the benchmark key a monthly cap and rate limits it never reaches",
    )
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs, databases)")
    p.add_argument(
        "--realtime",
        action="store_true",
        help="also run bench/realtime.py (50 Realtime sessions x 20 events/s, added latency)",
    )
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
                gw.prepare(key_limits=a.key_limits)
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
        if a.realtime:
            import realtime  # bench/realtime.py, beside this script

            log("realtime relay: 50 sessions x 20 events/s")
            text += "\n\n" + realtime.report(realtime.run(seconds=a.seconds)) + "\n"
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
