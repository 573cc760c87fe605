"""Constants, the run's error type and its log line."""

from __future__ import annotations

import os
import time
from pathlib import Path

# The bench/ folder (this module sits in bench/benchkit/).
BENCH = Path(__file__).resolve().parent.parent
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
