"""API keys, graceful SIGTERM, and engine death, each against a real server process."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time

import openai
import pytest
import requests

from server_utils import REPO_ROOT, RemoteServer
from test_faults import Client, no_process_left

pytestmark = pytest.mark.slow   # starts the real server with the default model

SMALL = ["--served-model-name", "smollm2", "--max-model-len", "256", "--kv-cache-memory", "64MiB", "--max-num-seqs", "8"]
STREAM = {"model": "smollm2", "prompt": "Write a long story.", "temperature": 1.0,
          "stream": True, "ignore_eos": True}


class TestApiKeysTlsCorsAndSigterm:
    """One HTTPS server with API keys and CORS; SIGTERM ends it (last test)."""

    @pytest.fixture(scope="class")
    def server(self, tmp_path_factory):
        args = ["--api-keys", "sekrit", "--shutdown-timeout", "120",
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

    def test_sigterm_drains_then_a_second_signal_aborts(self, server):
        url = server.url_for("v1", "completions")
        short = [Client(url, {**STREAM, "max_tokens": 12}, server.headers(), server.verify)
                 for _ in range(2)]
        # Batched with the short ones, it is still running when they end (200 > 12 steps).
        long = Client(url, {**STREAM, "max_tokens": 200}, server.headers(), server.verify)
        for client in (*short, long):
            assert client.first_chunk.wait(120)
        server.remember_children()
        children = server.children()
        assert children, "the engine core and its worker should be children of the server"
        server.send_signal(signal.SIGTERM)
        line = server.wait_for_log("Received SIGTERM", timeout_s=10)
        assert "in-flight requests get up to 120 s to finish" in line   # --shutdown-timeout
        # Draining: a new request gets an explicit 503, in-flight ones run to their end.
        refused = requests.post(url, json={**STREAM, "stream": False, "max_tokens": 1},
                                headers=server.headers(), timeout=30, verify=server.verify)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "engine_unavailable"
        for client in short:
            client.join(120)
            data = client.data()
            assert data[-1] == "[DONE]"
            finish = [d["choices"][0]["finish_reason"] for d in data[:-1] if d["choices"]]
            assert finish[-1] == "length"
        assert long.is_alive() and server.proc.poll() is None    # still draining
        # A second signal skips the rest of the grace period: the long stream is aborted.
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout_s=30) == 0
        long.join(30)
        data = long.data()
        assert data[-1] == "[DONE]"
        finish = [d["choices"][0]["finish_reason"] for d in data[:-1] if d["choices"]]
        assert finish[-1] == "abort"
        assert "aborting in-flight requests now" in server.wait_for_log("Second SIGTERM", 5)
        aborted = server.wait_for_log("Aborting 1 request(s)", timeout_s=5)
        assert aborted.endswith("of the 120 s grace period (a second signal)"), aborted
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
