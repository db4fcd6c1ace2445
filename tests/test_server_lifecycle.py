"""API keys, graceful SIGTERM, and engine death, each against a real server process."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time

import openai
import psutil
import pytest
import requests

from server_utils import REPO_ROOT, RemoteServer

pytestmark = pytest.mark.slow   # starts the real server with the default model

SMALL = ["--served-model-name", "smollm2", "--max-model-len", "256", "--kv-cache-memory", "64MiB", "--max-num-seqs", "8"]
LONG_STREAM = {"model": "smollm2", "prompt": "Write a long story.", "max_tokens": 200,
               "temperature": 1.0, "stream": True, "ignore_eos": True}


def no_process_left(processes: list[psutil.Process], timeout_s: float = 5) -> list[int]:
    """Pids of `processes` still running (zombies count as gone) after up to timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p.pid for p in processes
                 if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def read_stream_in_thread(url: str, body: dict, headers: dict, first_chunk: threading.Event,
                          events: list, verify=True):
    def run():
        try:
            with requests.post(url, json=body, headers=headers, stream=True, timeout=120,
                               verify=verify) as r:
                events.append(("status", r.status_code))
                for line in r.iter_lines(decode_unicode=True):
                    if line.startswith("data: "):
                        data = line[6:]
                        events.append(("data", data if data == "[DONE]" else json.loads(data)))
                        first_chunk.set()
        except requests.RequestException as exc:
            events.append(("exception", exc))
        first_chunk.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


class TestApiKeysTlsCorsAndSigterm:
    """One HTTPS server with API keys and CORS; SIGTERM ends it (last test)."""

    @pytest.fixture(scope="class")
    def server(self, tmp_path_factory):
        args = ["--api-keys", "sekrit", "--shutdown-timeout", "3",
                "--allowed-origins", "https://ui.example", *SMALL]
        tls_dir = tmp_path_factory.mktemp("tls") if shutil.which("openssl") else None
        with RemoteServer(args, env={"APHRODITE_API_KEY": "from-env"}, api_key="sekrit",
                          tls_dir=tls_dir) as server:
            yield server

    @pytest.mark.parametrize("headers,status", [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": "Bearer sekrit"}, 200),
        ({"Authorization": "bearer from-env"}, 200),
        ({"x-api-key": "sekrit"}, 200),
        ({"x-api-key": "sekrit-but-longer"}, 401),
    ])
    def test_api_key_check(self, server, headers, status):
        r = requests.get(server.url_for("v1", "models"), headers=headers, timeout=10,
                         verify=server.verify)
        assert r.status_code == status
        if status == 401:
            assert r.json()["error"]["type"] == "authentication_error"

    def test_health_and_metrics_stay_open(self, server):
        for path in ("health", "metrics"):
            assert requests.get(server.url_for(path), timeout=10, verify=server.verify).status_code == 200
        r = requests.post(server.url_for("v1", "completions"), timeout=10, verify=server.verify,
                          json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 401

    def test_cors(self, server):
        preflight = requests.options(server.url_for("v1", "chat", "completions"), timeout=10,
                                     verify=server.verify, headers={
                                         "Origin": "https://ui.example",
                                         "Access-Control-Request-Method": "POST",
                                         "Access-Control-Request-Headers": "authorization"})
        assert preflight.status_code == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == "https://ui.example"
        assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
        r = requests.get(server.url_for("v1", "models"), timeout=10, verify=server.verify,
                         headers={**server.headers(), "Origin": "https://ui.example"})
        assert r.headers["Access-Control-Allow-Origin"] == "https://ui.example"
        other = requests.get(server.url_for("v1", "models"), timeout=10, verify=server.verify,
                             headers={**server.headers(), "Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in other.headers

    def test_sdk_with_and_without_the_key(self, server):
        r = server.get_client().completions.create(model="smollm2", prompt="Hi", max_tokens=2)
        assert r.usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            server.get_client(api_key="nope").models.list()

    def test_sigterm_stops_in_flight_work_and_exits_zero(self, server):
        first_chunk, events = threading.Event(), []
        thread = read_stream_in_thread(server.url_for("v1", "completions"), LONG_STREAM,
                                       server.headers(), first_chunk, events, server.verify)
        assert first_chunk.wait(120)
        server.remember_children()
        children = server.children()
        assert children, "the engine core and its worker should be children of the server"
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout_s=30) == 0
        assert time.monotonic() - started < 3 + 15     # grace period + engine shutdown
        thread.join(30)
        data = [d for kind, d in events if kind == "data"]
        assert data[-1] == "[DONE]"                     # the stream was closed properly
        finish = [d["choices"][0]["finish_reason"] for d in data[:-1] if d["choices"]]
        assert finish[-1] in ("abort", "length")
        assert no_process_left(children) == []


def test_engine_death_fails_requests_and_exits_nonzero():
    command = [sys.executable, "-m", "aphrodite.cli", "run"]
    with RemoteServer(SMALL, command=command) as server:
        first_chunk, events = threading.Event(), []
        read_stream_in_thread(server.url_for("v1", "completions"), LONG_STREAM, {},
                              first_chunk, events)
        blocking: dict = {}

        def non_streaming():
            body = {**LONG_STREAM, "stream": False}
            blocking["response"] = requests.post(server.url_for("v1", "completions"),
                                                 json=body, timeout=120)

        blocker = threading.Thread(target=non_streaming, daemon=True)
        blocker.start()
        assert first_chunk.wait(120)
        server.remember_children()
        children = server.children()
        core = server.engine_core()
        killed_at = time.monotonic()
        core.kill()
        # /health fails at once (503 while the server winds down, refused once it exited).
        health = 200
        while health == 200 and time.monotonic() - killed_at < 5:
            try:
                health = requests.get(server.url_for("health"), timeout=5).status_code
            except requests.ConnectionError:
                health = None
        assert health in (503, None)
        code = server.wait(timeout_s=10)
        assert code != 0
        assert time.monotonic() - killed_at < 10
        blocker.join(10)
        response = blocking["response"]
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "engine_unavailable"
        data = [d for kind, d in events if kind == "data"]
        assert any(isinstance(d, dict) and "error" in d for d in data), data[-3:]
        assert data[-1] == "[DONE]"
        assert no_process_left(children) == []


def _start_unready(args: list[str]) -> RemoteServer:
    """Launch the server without waiting for it to become healthy."""
    server = RemoteServer(args)
    server.proc = subprocess.Popen(server.args, env=server.env, cwd=REPO_ROOT, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    threading.Thread(target=server._collect_output, daemon=True).start()
    return server


def test_sigterm_while_the_model_loads_exits_zero_without_orphans():
    server = _start_unready(SMALL)
    try:
        server.wait_for_log("Engine core process: pid", timeout_s=60)
        time.sleep(1.0)                      # the engine core is loading; workers may exist
        server.remember_children()
        children = server.children()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout_s=30) == 0
        assert no_process_left(children) == []
    finally:
        server.kill()


def test_a_missing_model_fails_fast_with_a_clear_message():
    server = _start_unready(["--model", "/no/such/model.gguf"])
    try:
        assert server.wait(timeout_s=60) == 2
        time.sleep(0.2)
        assert any("Start-up failed" in line and "/no/such/model.gguf" in line
                   for line in server.log), server.log[-5:]
    finally:
        server.kill()
