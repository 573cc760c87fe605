"""Two gateway processes on one PostgreSQL follow the same batch and charge it once."""

from __future__ import annotations

import asyncio
import json
import math
import os
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import openai
import pytest

from gateway.demo.fake_upstream import FAKE_UPSTREAM_KEY, FakeUpstream
from tests.conftest import create_schema, drop_schema, pg_url_with_schema, skip_without_postgres
from tests.integration.conftest import serve
from tests.multiprocess.test_several_instances import PRACTICE, USD, prepare_practice
from tests.processes import gateway_processes

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

LINES = 30


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    skip_without_postgres()
    schema = "mb_" + uuid.uuid4().hex[:12]
    await create_schema(schema)
    try:
        yield pg_url_with_schema(schema)
    finally:
        await drop_schema(schema)


def local_ports(pid: int) -> set[int]:
    """The local TCP ports of a process's sockets (Linux: its fds' inodes in /proc/net/tcp)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def line(n: int) -> bytes:
    body = {
        "model": "gpt-4o-mini",
        "max_tokens": 40,
        "messages": [{"role": "user", "content": f"Arztbrief {n} bitte kürzen."}],
    }
    request = {"custom_id": f"c{n}", "method": "POST", "url": "/v1/chat/completions", "body": body}
    return json.dumps(request).encode() + b"\n"


async def test_two_instances_follow_one_batch_and_charge_each_line_once(pg_url: str) -> None:
    """Both followers poll the batch (a few lines complete per poll; the fake sees retrieves
    over connections of each process); 30 events, one each, charged once."""
    key, store, db = await prepare_practice(pg_url, leave_micros=10 * USD)
    fake = FakeUpstream()
    fake.files_batches.lines_per_poll = 1  # 30-odd polls, shared by both instances
    try:
        async with serve(fake) as upstream_root:
            env = {
                "AZA_DATABASE_URL": pg_url,
                "AZA_DATABASE_POOL_SIZE": "5",
                "AZA_UPSTREAM_BASE_URL": upstream_root + "/v1",
                "OPENAI_API_KEY": FAKE_UPSTREAM_KEY,
                "AZA_JOB_POLL_MIN_SECONDS": "0.02",
                "AZA_JOB_POLL_MAX_SECONDS": "0.05",
                "AZA_LOG_LEVEL": "warning",
            }
            with gateway_processes(2, env) as instances:
                first, second = (
                    openai.AsyncOpenAI(base_url=i.url + "/v1", api_key=key, max_retries=0)
                    for i in instances
                )
                uploaded = await first.files.create(
                    file=("in.jsonl", b"".join(line(n) for n in range(LINES))), purpose="batch"
                )
                batch = await first.batches.create(
                    input_file_id=uploaded.id,
                    endpoint="/v1/chat/completions",
                    completion_window="24h",
                )
                # The other instance knows whose batch it is.
                assert (await second.batches.retrieve(batch.id)).id == batch.id
                # Which instance polled: the connection each retrieve came over, mapped to
                # the process whose socket it is while that connection is open.
                polled_by: dict[int, int] = {i.process.pid: 0 for i in instances}
                # From here on (the client's own retrieve above went through the second).
                seen = len(fake.files_batches.retrieve_peers)

                def attribute() -> None:
                    nonlocal seen
                    peers = fake.files_batches.retrieve_peers[seen:]
                    seen += len(peers)
                    owners = {pid: local_ports(pid) for pid in polled_by}
                    for _, port in peers:
                        for pid, ports in owners.items():
                            if port in ports:
                                polled_by[pid] += 1

                deadline = asyncio.get_running_loop().time() + 60
                while True:
                    attribute()
                    async with db.read() as conn:
                        settled = await conn.fetchval(
                            "SELECT settled_at FROM aza_batches WHERE batch_id = ?", batch.id
                        )
                    if settled is not None:
                        break
                    assert asyncio.get_running_loop().time() < deadline, "batch never settled"
                    await asyncio.sleep(0.02)
                attribute()
                assert all(polls > 0 for polls in polled_by.values()), polled_by
                await first.close()
                await second.close()
        async with db.read() as conn:
            events = await conn.fetchall(
                "SELECT request_id, estimated_cost_micro_usd FROM ai_usage_events "
                "WHERE practice_id = ? AND request_id LIKE 'batch:%'",
                PRACTICE,
            )
            charged = await conn.fetchval(
                "SELECT cost_micro_usd FROM aza_batches WHERE batch_id = ?", batch.id
            )
        expected = 0
        for raw in fake.files_batches.done_lines[batch.id]:
            usage = json.loads(raw)["response"]["body"]["usage"]
            expected += math.ceil(
                usage["prompt_tokens"] * Decimal("0.075")
                + usage["completion_tokens"] * Decimal("0.30")
            )
        assert sorted(row[0] for row in events) == sorted(
            f"batch:{batch.id}:c{n}" for n in range(LINES)
        )
        assert sum(int(row[1]) for row in events) == expected == charged
        assert fake.files_batches.retrieves >= LINES // 2
        assert await store.active_holds() == 0
        assert list(await store.totals_mismatches()) == []
    finally:
        await db.close()
