"""A busy --port fails at once with one clear line, before any model loads."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from server_utils import REPO_ROOT


def test_a_busy_port_fails_within_seconds_with_one_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "aphrodite.server", "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=60)
        elapsed = time.monotonic() - started
    lines = (result.stdout + result.stderr).splitlines()
    assert result.returncode == 2
    assert elapsed < 5, elapsed            # no engine was started, no model loaded
    assert len(lines) == 1, lines
    assert f"Port {port} on 127.0.0.1 is already in use" in lines[0]
    assert "--port" in lines[0]
