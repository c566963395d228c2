from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmesh.stack import binaries
from llmesh.stack.layout import free_port
from llmesh.stack.processes import wait_for_port


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real redis-server of its own, for this test module."""
    port = free_port()
    workdir: Path = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [str(binaries.redis_server()), "--port", str(port), "--save", "", "--dir", str(workdir)], stdout=subprocess.DEVNULL
    )
    wait_for_port(port, 10, "redis", proc.pid)
    yield port
    proc.terminate()
    proc.wait(10)
