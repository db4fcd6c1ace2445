"""Start the real server (`python -m aphrodite.server`) as a subprocess for end-to-end tests."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

REPO_ROOT = Path(__file__).resolve().parents[1]

SEED_MODEL_NAME = "meta-llama/Llama-3.1-70B-Instruct"   # the name the seed guide uses
# The end-to-end server shared by the test_server_* files: small enough for a 2-core CI box
# (a short context bounds the seed examples that set no max_tokens), serving the seed
# guide's model name as an alias of the default model.
E2E_MAX_MODEL_LEN = 128
E2E_SERVER_ARGS = ["--served-model-name", SEED_MODEL_NAME, "smollm2",
                   "--max-model-len", str(E2E_MAX_MODEL_LEN), "--kv-cache-memory", "256MiB",
                   "--max-num-seqs", "64", "--max-request-body", "256KiB"]
_SHARED: dict[tuple, "RemoteServer"] = {}


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return key, cert


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemoteServer:
    """One server process on a free port; `with RemoteServer([...]) as server: ...`.

    Output is collected in `self.log` (a list of lines) so tests can look for log lines.
    On exit the whole process tree is killed, whatever state it is in. Killed that way no
    process can clean up, so the tree gets a TMPDIR of its own (its IPC sockets go there),
    removed after the kill.
    """

    def __init__(self, args: list[str] | None = None, env: dict | None = None,
                 start_timeout_s: float = 240.0, api_key: str | None = None,
                 command: list[str] | None = None, tls_dir: Path | None = None):
        self.port = free_port()
        self.host = "127.0.0.1"
        self.api_key = api_key
        command = command or [sys.executable, "-m", "aphrodite.server"]
        self.args = [*command, *(args or []), "--host", self.host, "--port", str(self.port)]
        self.scheme, self.verify = "http", True
        if tls_dir is not None:   # HTTPS with a self-signed certificate for 127.0.0.1
            key, cert = self_signed_certificate(tls_dir)
            self.args += ["--ssl-keyfile", str(key), "--ssl-certfile", str(cert)]
            self.scheme, self.verify = "https", str(cert)
        self.tmp_dir = tempfile.mkdtemp(prefix="aphrodite-test-")
        self.env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep +
                    os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1",
                    "TMPDIR": self.tmp_dir, **(env or {})}
        self.start_timeout_s = start_timeout_s
        self.log: list[str] = []
        self.proc: subprocess.Popen | None = None
        self._known: list[psutil.Process] = []

    # ---- life cycle --------------------------------------------------------------------------
    def __enter__(self) -> "RemoteServer":
        self.proc = subprocess.Popen(self.args, env=self.env, cwd=REPO_ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._collect_output, daemon=True).start()
        try:
            self.wait_healthy()
        except BaseException:
            self.kill()
            raise
        self.remember_children()
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    def _collect_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line.rstrip("\n"))
            if os.environ.get("APHRODITE_TEST_SERVER_ECHO"):
                print("[server]", line, end="", file=sys.stderr)

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during start-up:\n"
                                   + "\n".join(self.log[-40:]))
            try:
                if requests.get(self.url_for("health"), timeout=2,
                                verify=self.verify).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not healthy after {self.start_timeout_s} s:\n"
                           + "\n".join(self.log[-40:]))

    def remember_children(self) -> None:
        """Record the process tree so `kill` and tests can find orphans later."""
        try:
            root = psutil.Process(self.proc.pid)
            found = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        known = {p.pid for p in self._known}
        self._known.extend(p for p in found if p.pid not in known)

    def children(self) -> list[psutil.Process]:
        """Descendants of the server recorded so far (engine core, workers, helpers)."""
        return [p for p in self._known if self.proc is None or p.pid != self.proc.pid]

    def alive_known_processes(self) -> list[psutil.Process]:
        return [p for p in self._known if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def engine_core(self) -> psutil.Process:
        """The engine-core process, from the pid the server logs at start-up."""
        line = self.wait_for_log("Engine core process: pid ", timeout_s=1)
        return psutil.Process(int(re.search(r"pid (\d+)", line).group(1)))

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.proc is None:
            return
        self.remember_children()
        for proc in self._known:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(self._known, timeout=10)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    # ---- clients -------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def url_for(self, *parts: str) -> str:
        return "/".join([self.base_url, *parts])

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def get_client(self, **kwargs):
        import openai
        kwargs.setdefault("api_key", self.api_key or "dummy")
        if self.scheme == "https":
            context = ssl.create_default_context(cafile=self.verify)
            kwargs.setdefault("http_client", openai.DefaultHttpxClient(verify=context))
        return openai.OpenAI(base_url=self.url_for("v1"), max_retries=0, timeout=600, **kwargs)

    def get_async_client(self, **kwargs):
        import openai
        kwargs.setdefault("api_key", self.api_key or "dummy")
        return openai.AsyncOpenAI(base_url=self.url_for("v1"), max_retries=0, timeout=600, **kwargs)

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics as {'name{labels}': value}."""
        from prometheus_client.parser import text_string_to_metric_families

        text = requests.get(self.url_for("metrics"), timeout=10, verify=self.verify).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}"] = sample.value
        return samples

    def metric(self, name: str, **labels) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        from prometheus_client.parser import text_string_to_metric_families

        text = requests.get(self.url_for("metrics"), timeout=10, verify=self.verify).text
        total, found = 0.0, False
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
                    found = True
        if not found:
            raise KeyError(name)
        return total

    def wait_for_log(self, needle: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.log):
                if needle in line:
                    return line
            time.sleep(0.2)
        raise TimeoutError(f"{needle!r} not in the server log")


def terminate(server: RemoteServer, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
    server.remember_children()
    server.send_signal(sig)
    return server.wait(timeout_s)


# The usage guide's presets (seed-usage.md, "Presets for Different Use Cases"), as it lists them.
GUIDE_PRESETS = {
    "Creative Writing": {"temperature": 0.9, "top_p": 0.95, "repetition_penalty": 1.15,
                         "min_p": 0.05},
    "Dialogue/Chat": {"temperature": 0.85, "top_p": 0.9, "repetition_penalty": 1.2,
                      "frequency_penalty": 0.2},
    "Factual/Precise": {"temperature": 0.3, "top_p": 0.9, "repetition_penalty": 1.1},
    "Experimental/Wild": {"temperature": 1.2, "top_p": 0.95, "top_k": 100, "min_p": 0.01},
}


def wait_idle(server: RemoteServer, gauges: tuple[str, ...], timeout_s: float = 30
              ) -> dict[str, float]:
    """The gauges' values once all are zero, or as they stand after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = {name: server.metric(name) for name in gauges}
        if not any(values.values()) or time.monotonic() > deadline:
            return values
        time.sleep(0.25)


def shared_server(args: list[str] = E2E_SERVER_ARGS) -> RemoteServer:
    """One server per pytest process for these args, shared by every test file that asks
    (each start costs tens of seconds); killed when the process exits."""
    key = tuple(args)
    if key not in _SHARED:
        server = RemoteServer(list(args)).__enter__()
        atexit.register(server.kill)
        _SHARED[key] = server
    server = _SHARED[key]
    if server.proc.poll() is not None:
        raise RuntimeError(f"the shared server exited with {server.proc.returncode}")
    return server
