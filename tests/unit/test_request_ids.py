"""Request ids: `req_` and 32 hex digits, never repeated, in this process or a forked one."""

from __future__ import annotations

import os
import re

from gateway.request_context import new_request_id

FORMAT = re.compile(r"req_[0-9a-f]{32}")


def test_request_ids_have_the_format_and_never_repeat() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert all(FORMAT.fullmatch(request_id) for request_id in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_process_numbers_under_a_prefix_of_its_own() -> None:
    parent = new_request_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert FORMAT.fullmatch(child)
    assert child[4:20] != parent[4:20]  # another 64-bit prefix
    assert new_request_id()[4:20] == parent[4:20]  # the parent's is unchanged
