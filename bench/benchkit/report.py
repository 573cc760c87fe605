"""The report: the table printed and written to bench/results/."""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from benchkit.arms import Arm
from benchkit.common import PACE_CHUNK, PACE_RATE, TARGETS


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
