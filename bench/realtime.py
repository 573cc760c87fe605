#!/usr/bin/env python3
"""Realtime relay benchmark: the latency the gateway adds to each relayed event.

    python3 bench/realtime.py                       # 50 sessions x 20 events/s, 10 s per arm
    python3 bench/realtime.py --sessions 10 --seconds 3

One run measures two arms with the same client: straight to a fake Realtime
upstream ("direct"), and through `aza-gateway serve` (SQLite) to the same
upstream ("gateway"). The upstream (a process of its own) streams each
session's responses at the given rate: `response.created`, audio deltas of
50 ms of 24 kHz PCM16 each, and `response.done` with usage, once a second,
so the gateway meters one response per session per second (a hold when the
response starts, a usage event when it is done) while it relays; each session
starts its responses at a random phase of the second, as independent
sessions would. Each event's
`event_id` carries the upstream's send time (`time.time_ns()`, taken as the
event is written); the client takes its receive time as soon as its
connection hands the event over, the same code for both arms. Added latency
= gateway percentile minus direct percentile (p50, p99). Goals: p50 <= 0.2
ms, p99 <= 2 ms added.

The arms take turns (`--rounds`, the order alternating: direct, gateway,
gateway, direct, ...), each round opening its sessions afresh and measuring
after a short warm-up, so that a machine whose load drifts during the run
weighs on both arms alike. Client and upstream run on uvloop where it is
installed, as the gateway does. Also reported: the gateway process's CPU time
per relayed event (Linux, from /proc), which load on the machine hardly
moves. `--floor` adds a third arm, a bare relay of websockets' own server and
client (no app, no metering): the least any Python relay hop adds here.

Nothing here is imported by the gateway or its tests.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

UPSTREAM_KEY = "sk-bench-realtime"
DELTA = base64.b64encode(bytes(2_400)).decode()  # 50 ms of 24 kHz 16-bit silence
MODEL = "gpt-realtime-mini"


def run_async(coro: Any) -> Any:
    """Run `coro` on uvloop where installed (as the gateway runs), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the fake upstream (a process of its own) ---------------------------------


async def serve_upstream(port: int, rate: float) -> None:
    """A Realtime upstream that streams one response a second at `rate` events a second."""
    from websockets.asyncio.server import ServerConnection, serve

    # wait_port's bare TCP probe is no handshake; websockets would log it as one.
    logging.getLogger("websockets.server").setLevel(logging.CRITICAL)
    per_response = max(3, int(rate))
    interval = 1.0 / rate

    async def session(ws: ServerConnection) -> None:
        number = 0
        stamp = time.time_ns

        async def send(event: dict[str, object]) -> None:
            await ws.send(
                json.dumps(
                    {"type": event.pop("type"), "event_id": f"event_{stamp()}", **event},
                    separators=(",", ":"),
                )
            )

        await send(
            {
                "type": "session.created",
                "session": {
                    "id": f"sess_{id(ws)}",
                    "type": "realtime",
                    "model": MODEL,
                    "max_output_tokens": 200,
                },
            }
        )
        loop = asyncio.get_running_loop()
        # Sessions are independent: each starts its responses at a phase of its own
        # (else all 50 would start one in the same millisecond every second).
        next_at = loop.time() + random.random() * per_response * interval
        try:
            while True:
                number += 1
                rid = f"resp_{id(ws)}_{number}"
                for index in range(per_response):
                    next_at += interval
                    await asyncio.sleep(max(0.0, next_at - loop.time()))
                    if index == 0:
                        await send(
                            {
                                "type": "response.created",
                                "response": {
                                    "id": rid,
                                    "object": "realtime.response",
                                    "status": "in_progress",
                                },
                            }
                        )
                    elif index == per_response - 1:
                        usage = {
                            "total_tokens": 60,
                            "input_tokens": 20,
                            "output_tokens": 40,
                            "input_token_details": {
                                "text_tokens": 10,
                                "audio_tokens": 10,
                                "cached_tokens": 0,
                            },
                            "output_token_details": {"text_tokens": 4, "audio_tokens": 36},
                        }
                        await send(
                            {
                                "type": "response.done",
                                "response": {
                                    "id": rid,
                                    "object": "realtime.response",
                                    "status": "completed",
                                    "usage": usage,
                                },
                            }
                        )
                    else:
                        await send(
                            {
                                "type": "response.output_audio.delta",
                                "response_id": rid,
                                "item_id": f"item_{number}",
                                "output_index": 0,
                                "content_index": 0,
                                "delta": DELTA,
                            }
                        )
        except Exception:
            return

    async def handler(ws: ServerConnection) -> None:
        await session(ws)

    async with serve(handler, "127.0.0.1", port, max_size=None, compression=None):
        await asyncio.Event().wait()


# -- the client -------------------------------------------------------------------


async def measure(
    url: str,
    key: str,
    sessions: int,
    seconds: float,
    warmup: float,
    on_record: Callable[[bool], None] | None = None,
) -> list[int]:
    """Open `sessions` sessions at `url`; after `warmup`, each event's latency in ns for
    `seconds`. `on_record(True)` / `(False)` mark the start and end of the measured time."""
    from websockets.asyncio.client import ClientConnection, connect

    samples: list[int] = []
    recording = [False]
    marker = '"event_id":"event_'

    async def read(ws: ClientConnection) -> None:
        async for message in ws:
            now = time.time_ns()  # as soon as the connection hands the event over
            if not recording[0] or isinstance(message, bytes):
                continue
            start = message.find(marker)
            if start >= 0:
                start += len(marker)
                samples.append(now - int(message[start : message.index('"', start)]))

    connections = await asyncio.gather(
        *(
            connect(
                url,
                additional_headers={"Authorization": f"Bearer {key}"},
                max_size=None,
                compression=None,
            )
            for _ in range(sessions)
        )
    )
    readers = [asyncio.create_task(read(ws)) for ws in connections]
    try:
        await asyncio.sleep(warmup)
        if on_record:
            on_record(True)
        recording[0] = True
        await asyncio.sleep(seconds)
        recording[0] = False
        if on_record:
            on_record(False)
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await asyncio.gather(*(ws.close() for ws in connections), return_exceptions=True)
    return samples


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process `pid` (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- a bare relay (the floor arm) -------------------------------------------------


async def serve_relay(port: int, upstream_port: int) -> None:
    """websockets' server relaying to its client, nothing else: what a Python hop costs."""
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import ServerConnection, serve

    logging.getLogger("websockets.server").setLevel(logging.CRITICAL)

    async def handler(ws: ServerConnection) -> None:
        path = ws.request.path if ws.request is not None else "/"
        async with connect(
            f"ws://127.0.0.1:{upstream_port}{path}", max_size=None, compression=None
        ) as upstream:

            async def client_to_upstream() -> None:
                async for message in ws:
                    await upstream.send(message)

            task = asyncio.create_task(client_to_upstream())
            try:
                async for message in upstream:
                    await ws.send(message)
            finally:
                task.cancel()

    async with serve(handler, "127.0.0.1", port, max_size=None, compression=None):
        await asyncio.Event().wait()


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


# -- orchestration --------------------------------------------------------------


def gateway_command() -> list[str]:
    found = shutil.which("aza-gateway") or str(Path(sys.executable).with_name("aza-gateway"))
    return [found]


def wait_port(port: int, proc: subprocess.Popen[bytes], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {seconds} s")


def prepare_gateway(env: dict[str, str]) -> str:
    """Migrate, one practice with a license, one key; returns the key."""
    cmd = gateway_command()
    subprocess.run([*cmd, "migrate"], env=env, check=True, capture_output=True)
    subprocess.run(
        [*cmd, "license", "create", "--practice", "bench", "--plan", "aza_team_monthly"],
        env=env,
        check=True,
        capture_output=True,
    )
    out = subprocess.run(
        [*cmd, "key", "create", "--practice", "bench"], env=env, check=True, capture_output=True
    )
    return out.stdout.decode().strip().splitlines()[-1]


def run(
    sessions: int = 50,
    rate: float = 20.0,
    seconds: float = 10.0,
    warmup: float = 1.0,
    rounds: int = 4,
    floor: bool = False,
) -> dict[str, float]:
    """The arms in turns in one run; returns the figures (milliseconds, counts)."""
    procs: list[subprocess.Popen[bytes]] = []
    folder = Path(tempfile.mkdtemp(prefix="aza-bench-realtime-"))
    try:
        up_port = free_port()
        upstream = subprocess.Popen(
            [sys.executable, __file__, "--serve-upstream", str(up_port), "--rate", str(rate)],
        )
        procs.append(upstream)
        wait_port(up_port, upstream)
        env = {
            **os.environ,
            "AZA_DATABASE_URL": f"sqlite:///{folder / 'gateway.sqlite'}",
            "AZA_UPSTREAM_BASE_URL": f"http://127.0.0.1:{up_port}/v1",
            "OPENAI_API_KEY": UPSTREAM_KEY,
            "AZA_LOG_LEVEL": "warning",
        }
        key = prepare_gateway(env)
        gw_port = free_port()
        gateway = subprocess.Popen(
            [*gateway_command(), "serve", "--host", "127.0.0.1", "--port", str(gw_port)],
            env=env,
        )
        procs.append(gateway)
        wait_port(gw_port, gateway)
        query = f"/v1/realtime?model={MODEL}"
        arms = {
            "direct": (f"ws://127.0.0.1:{up_port}{query}", UPSTREAM_KEY),
            "gateway": (f"ws://127.0.0.1:{gw_port}{query}", key),
        }
        if floor:
            relay_port = free_port()
            relay = subprocess.Popen(
                [sys.executable, __file__, "--serve-relay", str(relay_port), str(up_port)]
            )
            procs.append(relay)
            wait_port(relay_port, relay)
            arms["floor"] = (f"ws://127.0.0.1:{relay_port}{query}", UPSTREAM_KEY)
        samples: dict[str, list[int]] = {name: [] for name in arms}
        # CPU seconds of the relaying process (gateway, floor) while its arm is measured.
        relays = {"gateway": gateway.pid, **({"floor": procs[-1].pid} if floor else {})}
        cpu = dict.fromkeys(relays, 0.0)

        def cpu_hook(name: str) -> Callable[[bool], None] | None:
            if name not in relays:
                return None
            started = [0.0]

            def hook(start: bool) -> None:
                now = cpu_seconds(relays[name])
                if now is not None and start:
                    started[0] = now
                elif now is not None:
                    cpu[name] += now - started[0]

            return hook

        names = list(arms)
        per_round = seconds / max(1, rounds)
        for number in range(max(1, rounds)):
            order = names if number % 2 == 0 else names[::-1]
            for name in order:
                url, arm_key = arms[name]
                samples[name] += run_async(
                    measure(url, arm_key, sessions, per_round, warmup, on_record=cpu_hook(name))
                )
        direct, through = samples["direct"], samples["gateway"]
        figures = {
            "sessions": sessions,
            "events_per_second": rate,
            "rounds": max(1, rounds),
            "direct_events": len(direct),
            "gateway_events": len(through),
            "direct_p50_ms": percentile(direct, 0.50),
            "direct_p99_ms": percentile(direct, 0.99),
            "gateway_p50_ms": percentile(through, 0.50),
            "gateway_p99_ms": percentile(through, 0.99),
            "gateway_mean_ms": statistics.fmean(through) / 1e6,
            "gateway_cpu_us_per_event": 1e6 * cpu["gateway"] / max(1, len(through)),
        }
        figures["added_p50_ms"] = figures["gateway_p50_ms"] - figures["direct_p50_ms"]
        figures["added_p99_ms"] = figures["gateway_p99_ms"] - figures["direct_p99_ms"]
        if floor:
            figures["floor_p50_ms"] = percentile(samples["floor"], 0.50)
            figures["floor_p99_ms"] = percentile(samples["floor"], 0.99)
            figures["floor_cpu_us_per_event"] = 1e6 * cpu["floor"] / max(1, len(samples["floor"]))
        return figures
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
        shutil.rmtree(folder, ignore_errors=True)


def report(figures: dict[str, float]) -> str:
    ok50 = figures["added_p50_ms"] <= 0.2
    ok99 = figures["added_p99_ms"] <= 2.0
    arms = ("direct", "gateway", "floor") if "floor_p50_ms" in figures else ("direct", "gateway")
    return "\n".join(
        [
            f"Realtime relay: {figures['sessions']:.0f} sessions x "
            f"{figures['events_per_second']:.0f} events/s, {figures['rounds']:.0f} rounds "
            f"({figures['gateway_events']:.0f} events through the gateway, "
            f"{figures['direct_events']:.0f} direct)",
            *(
                f"  {arm:<7} p50 {figures[arm + '_p50_ms']:.3f} ms  "
                f"p99 {figures[arm + '_p99_ms']:.3f} ms"
                for arm in arms
            ),
            f"  added   p50 {figures['added_p50_ms']:.3f} ms (goal <= 0.2: "
            f"{'met' if ok50 else 'MISSED'})  p99 {figures['added_p99_ms']:.3f} ms "
            f"(goal <= 2: {'met' if ok99 else 'MISSED'})",
            f"  gateway CPU {figures['gateway_cpu_us_per_event']:.0f} us per relayed event "
            "(metering included)"
            + (
                f"; floor {figures['floor_cpu_us_per_event']:.0f} us"
                if "floor_cpu_us_per_event" in figures
                else ""
            ),
        ]
    )


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--rate", type=float, default=20.0, help="events a second per session")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per arm")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before each round counts")
    p.add_argument("--rounds", type=int, default=4, help="turns per arm (order alternating)")
    p.add_argument("--floor", action="store_true", help="also a bare websockets relay arm")
    p.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--serve-relay", type=int, nargs=2, metavar="PORT", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve_upstream:
        with contextlib.suppress(KeyboardInterrupt):
            run_async(serve_upstream(a.serve_upstream, a.rate))
        return 0
    if a.serve_relay:
        with contextlib.suppress(KeyboardInterrupt):
            run_async(serve_relay(*a.serve_relay))
        return 0
    print(report(run(a.sessions, a.rate, a.seconds, a.warmup, a.rounds, a.floor)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
