"""Faults against a real server under load: a killed or hung worker, a killed engine core,
a killed frontend. Every in-flight client gets an explicit error, the server exits non-zero
within the watchdog limit, and no engine or worker process is left behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import psutil
import pytest
import requests

from server_utils import REPO_ROOT, RemoteServer

pytestmark = pytest.mark.slow   # starts the real server with the default model

SMALL = ["--served-model-name", "smollm2", "--max-model-len", "256", "--kv-cache-memory",
         "64MiB", "--max-num-seqs", "8", "--num-threads", "1"]
# Long enough (ignore_eos, 240 tokens) to be still running when the fault is injected.
LONG = {"model": "smollm2", "prompt": "Write a long story.", "max_tokens": 240,
        "temperature": 1.0, "ignore_eos": True}
# APHRODITE_ENGINE_ITERATION_TIMEOUT_S for the hang test: small, yet above the step time of
# a 2-core CI box that other jobs load too.
HANG_TIMEOUT_S = 20


def no_process_left(processes: list[psutil.Process], timeout_s: float = 5) -> list[int]:
    """Pids of `processes` still running (zombies count as gone) after up to timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for p in processes:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


class Client(threading.Thread):
    """One request in a thread: `events` gets ("status", code), then ("data", chunk) per
    SSE event for a stream or ("json", body) otherwise, or ("exception", exc)."""

    def __init__(self, url: str, body: dict, headers: dict | None = None, verify=True):
        super().__init__(daemon=True)
        self.url, self.body, self.headers, self.verify = url, body, headers or {}, verify
        self.events: list = []
        self.first_chunk = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            stream = self.body.get("stream", False)
            with requests.post(self.url, json=self.body, headers=self.headers, stream=stream,
                               timeout=120, verify=self.verify) as r:
                self.events.append(("status", r.status_code))
                if not stream:
                    self.events.append(("json", r.json()))
                for line in r.iter_lines(decode_unicode=True) if stream else ():
                    if line.startswith("data: "):
                        data = line[6:]
                        self.events.append(("data", data if data == "[DONE]" else json.loads(data)))
                        self.first_chunk.set()
        except requests.RequestException as exc:
            self.events.append(("exception", exc))
        self.first_chunk.set()

    def data(self) -> list:
        return [d for kind, d in self.events if kind == "data"]


def start_load(server: RemoteServer, num_streams: int = 3, num_plain: int = 2) -> list[Client]:
    """Streaming and non-streaming requests, returned once the engine runs all of them."""
    url = server.url_for("v1", "completions")
    # The first model step pays one-off costs; keep them out of the watchdog's window.
    warm_up = requests.post(url, json={**LONG, "max_tokens": 2}, timeout=120)
    assert warm_up.status_code == 200
    clients = [Client(url, {**LONG, "stream": True}) for _ in range(num_streams)]
    clients += [Client(url, {**LONG, "stream": False}) for _ in range(num_plain)]
    for client in clients[:num_streams]:
        assert client.first_chunk.wait(120)
    deadline = time.monotonic() + 60
    while server.metric("aphrodite:num_requests_running") < len(clients):
        assert time.monotonic() < deadline, "the requests never all ran"
        time.sleep(0.1)
    return clients


def assert_explicit_errors(clients: list[Client]) -> None:
    """Every stream ends with an OpenAI-shaped error event then [DONE]; every plain
    request gets a 503 JSON error."""
    for client in clients:
        client.join(30)
        assert not client.is_alive(), "a client is still waiting"
        assert client.events[0] == ("status", 200) or client.events[0] == ("status", 503)
        if client.body["stream"]:
            data = client.data()
            assert data[-1] == "[DONE]"
            error = data[-2]["error"]
            assert error["code"] == "engine_unavailable" and error["type"] and error["message"]
        else:
            assert client.events[0] == ("status", 503)
            assert client.events[1][1]["error"]["code"] == "engine_unavailable"


def health_fails(server: RemoteServer, timeout_s: float) -> bool:
    """/health turns 503 (or the port closes) within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(server.url_for("health"), timeout=5).status_code == 503:
                return True
        except requests.ConnectionError:
            return True
        time.sleep(0.1)
    return False


def socket_folder(core: psutil.Process) -> str:
    """The frontend's folder of IPC sockets (the core's own sockets live inside it)."""
    input_addr = json.loads(core.cmdline()[3])["input_addr"]     # python -m module ARGS
    assert input_addr.startswith("ipc://")
    return os.path.dirname(input_addr[len("ipc://"):])


def folder_gone(path: str, timeout_s: float = 5) -> bool:
    deadline = time.monotonic() + timeout_s
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not os.path.exists(path)


def engine_processes(server: RemoteServer) -> tuple[psutil.Process, list[psutil.Process]]:
    """The engine core and its workers (pids from the start-up log), plus any other child
    the core has."""
    core = server.engine_core()
    line = server.wait_for_log("worker_pids=", timeout_s=1)
    pids = [int(p) for p in re.search(r"worker_pids=\[([\d, ]+)\]", line).group(1).split(",")]
    workers = [psutil.Process(pid) for pid in pids]
    others = [p for p in core.children() if p.pid not in pids]
    return core, workers + others


@pytest.mark.parametrize("fault", ["kill-worker", "stop-worker", "kill-core"])
def test_fault_under_load_fails_requests_and_exits_nonzero(fault):
    env = {"APHRODITE_ENGINE_ITERATION_TIMEOUT_S": str(HANG_TIMEOUT_S)} if fault == "stop-worker" else {}
    # The core-kill case goes through the `aphrodite run` CLI, which must behave the same.
    command = [sys.executable, "-m", "aphrodite.cli", "run"] if fault == "kill-core" else None
    with RemoteServer(SMALL, env=env, command=command) as server:
        clients = start_load(server)
        core, workers = engine_processes(server)
        sockets = socket_folder(core)
        started = time.monotonic()
        if fault == "kill-worker":
            workers[0].kill()
        elif fault == "stop-worker":
            workers[0].suspend()                  # SIGSTOP: a hang the worker cannot notice
        else:
            core.kill()
        assert health_fails(server, timeout_s=HANG_TIMEOUT_S + 10)
        code = server.wait(timeout_s=HANG_TIMEOUT_S + 40)
        elapsed = time.monotonic() - started
        assert code != 0
        # Generous bounds (a loaded CI box is slow): they catch a hang, not a slow exit.
        limit = HANG_TIMEOUT_S + 30 if fault == "stop-worker" else 30
        assert elapsed < limit, f"exit took {elapsed:.1f} s"
        assert_explicit_errors(clients)
        assert no_process_left([core, *workers]) == []
        assert folder_gone(sockets), "IPC sockets left in the temporary folder"
        log = "\n".join(server.log)
        if fault == "stop-worker":
            assert "APHRODITE_ENGINE_ITERATION_TIMEOUT_S" in log
        elif fault == "kill-worker":
            assert f"pid {workers[0].pid}) died" in log


# A stand-in frontend: starts the engine core from its main thread like the server does,
# optionally waits until it generates, then sleeps until it is killed.
FRONTEND = """
import sys, time
from aphrodite.config import EngineConfig
from aphrodite.frontend.engine_process import EngineProcess
from aphrodite.protocol import AddRequest, Frame, decode
from aphrodite.sampling_params import SamplingParams

engine = EngineProcess(EngineConfig(max_model_len=256, kv_cache_memory=64 << 20, num_threads=1))
print("core", engine.proc.pid, flush=True)
if sys.argv[1] == "generating":
    engine.wait_ready(300)
    params = SamplingParams(max_tokens=240, ignore_eos=True).to_dict()
    engine.send(Frame.ADD, AddRequest("r", [1, 2, 3], params, time.time()))
    while True:
        frame, body = decode(engine.output_socket.recv())
        if frame is Frame.STEP_OUTPUTS and any(o.new_token_ids for o in body.outputs):
            break
    print("generating", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("phase", ["loading", "generating"])
def test_kill_9_of_the_frontend_takes_the_engine_down(phase):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    frontend = subprocess.Popen([sys.executable, "-c", FRONTEND, phase], env=env, cwd=REPO_ROOT,
                                stdout=subprocess.PIPE, text=True)
    engine: list[psutil.Process] = []
    try:
        core = psutil.Process(int(frontend.stdout.readline().split()[1]))
        engine.append(core)
        sockets = socket_folder(core)
        deadline = time.monotonic() + 120
        while not is_loading_a_worker(core):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        if phase == "generating":
            assert frontend.stdout.readline().strip() == "generating"
        engine += core.children()
        frontend.kill()
        frontend.wait(10)
        left = no_process_left(engine, timeout_s=5)
        assert left == [], [(p.pid, p.cmdline()) for p in engine if p.pid in left]
        # the frontend could not clean up after itself: the core did
        assert folder_gone(sockets), "IPC sockets left in the temporary folder"
    finally:
        frontend.kill()
        for proc in engine:
            try:
                proc.kill()
            except psutil.Error:
                pass


def is_loading_a_worker(core: psutil.Process) -> bool:
    """The core has started a worker (python -m aphrodite.executor.worker)."""
    for child in core.children():
        try:
            if "aphrodite.executor.worker" in child.cmdline():
                return True
        except psutil.Error:
            pass
    return False
