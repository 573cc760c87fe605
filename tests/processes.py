"""Gateway OS processes for tests: `aza-gateway serve` started on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Instance:
    url: str
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def gateway_processes(count: int, env: dict[str, str]) -> Iterator[list[Instance]]:
    """Start `count` gateway OS processes on free ports; stop them all afterwards."""
    instances: list[Instance] = []
    with tempfile.TemporaryDirectory() as logdir:
        logs = [Path(logdir) / f"gateway-{n}.log" for n in range(count)]
        try:
            for log in logs:
                port = free_port()
                # A file, not a pipe: a chatty process must never block on a full pipe.
                # The child keeps its own descriptor once started.
                with log.open("wb") as stderr:
                    process = subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "gateway.cli",
                            "serve",
                            "--host",
                            "127.0.0.1",
                            "--port",
                            str(port),
                        ],
                        env={**os.environ, **env},
                        stdout=subprocess.DEVNULL,
                        stderr=stderr,
                    )
                instances.append(Instance(f"http://127.0.0.1:{port}", process))
            deadline = time.monotonic() + 30
            for instance, log in zip(instances, logs, strict=True):
                while True:
                    if instance.process.poll() is not None:
                        raise RuntimeError(log.read_text()[-2000:])
                    with contextlib.suppress(httpx.HTTPError):
                        if httpx.get(instance.url + "/readyz", timeout=1).status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise RuntimeError("gateway process did not become ready")
                    time.sleep(0.1)
            yield instances
        finally:
            for instance in instances:
                instance.process.terminate()
            for instance in instances:
                try:
                    instance.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    instance.process.kill()
                    instance.process.wait()
