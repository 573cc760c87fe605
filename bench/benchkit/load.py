"""Request bodies, the wrk load and the curl stream timings."""

from __future__ import annotations

import json
import re
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from benchkit.common import LUA, MODEL, BenchError
from benchkit.procs import _PROCS, run, stop


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
