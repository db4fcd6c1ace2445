"""`python -m aphrodite.server`: the OpenAI-compatible HTTP server.

Life cycle: spawn the engine core (which loads the model and spawns the workers) while
the tokenizer loads here, then serve HTTP until SIGTERM/SIGINT or until the engine dies.
On a signal: refuse new requests, give in-flight ones the grace period, abort the rest,
stop the engine, exit 0. On engine death: in-flight requests get 503 errors, /health
says 503, and the process exits 1 so a supervisor (systemd) restarts it. Either way no
child process outlives the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import signal
import socket
import ssl
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from aphrodite.config import EngineConfig
from aphrodite.frontend.args import ServerOptions, parse_args
from aphrodite.processes import configure_logging

logger = logging.getLogger("aphrodite.server")

EXIT_OK, EXIT_ENGINE_DEAD, EXIT_START_FAILED = 0, 1, 2
# Longest wait for handlers to write their last events (a 503, an error event, [DONE])
# before the listener closes: closing earlier cuts streams in the middle of an event.
FINAL_WRITES_TIMEOUT_S = 10.0


def setup_logging() -> None:
    configure_logging("server", sys.stdout)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class PortUnavailable(OSError):
    """The listening address cannot be bound (in use, not permitted, unknown host)."""


def bind_listen_sockets(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address of host:port, not yet listening.

    Bound first thing, so a busy port fails in a second rather than after the model has
    loaded; until the HTTP server listens on them, connections are refused as before."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortUnavailable(f"cannot listen on --host {host!r}: {exc.strerror}") from exc
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        reason = ("is already in use (is another server running? choose another with --port)"
                  if exc.errno == errno.EADDRINUSE else f"cannot be used: {exc.strerror}")
        raise PortUnavailable(f"Port {port} on {host} {reason}") from exc
    return sockets


def browser_url(scheme: str, host: str, port: int) -> str:
    """The address to open in a browser: a wildcard host means this machine."""
    if host in ("", "0.0.0.0", "::"):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}/"


class Server:
    def __init__(self, config: EngineConfig, options: ServerOptions):
        self.config = config
        self.options = options
        self.stop_requested = asyncio.Event()
        self.hurry = asyncio.Event()          # a second signal: skip the grace period
        self.engine_dead = asyncio.Event()
        self.stats_task: asyncio.Task | None = None
        self.stage = "starting"   # starting -> serving -> draining -> stopping
        self.listen_sockets: list[socket.socket] = []

    async def run(self) -> int:
        from aphrodite.frontend.process_tree import ProcessTree

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            self.listen_sockets = bind_listen_sockets(self.options.host, self.options.port)
        except PortUnavailable as exc:
            logger.error("%s", exc)
            return EXIT_START_FAILED
        tree = ProcessTree()
        try:
            return await self._run(tree)
        finally:
            tree.kill_remaining()
            for sock in self.listen_sockets:
                sock.close()

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if not self.stop_requested.is_set():
            self.stop_requested.set()
            if self.stage == "starting":
                logger.info("Received %s: stopping start-up", name)
            else:
                logger.info("Received %s: shutting down; in-flight requests get up to %.0f s "
                            "to finish (--shutdown-timeout); send it again to abort them now",
                            name, self.options.shutdown_timeout_s)
            return
        if self.stage == "draining" and not self.hurry.is_set():
            logger.warning("Second %s: aborting in-flight requests now", name)
        else:
            logger.warning("Second %s: already shutting down, nothing left to skip; waiting "
                           "for the processes to exit", name)
        self.hurry.set()

    async def _run(self, tree) -> int:
        from aphrodite.frontend.engine_process import EngineProcess

        started = await self._start_engine(EngineProcess, tree)
        if started is None:
            return EXIT_OK if self.stop_requested.is_set() else EXIT_START_FAILED
        engine, tokenizer, files = started
        client, api, runner = await self._start_http(engine, tokenizer, files, tree)
        self.stage = "serving"
        try:
            stop = asyncio.ensure_future(self.stop_requested.wait())
            dead = asyncio.ensure_future(self.engine_dead.wait())
            await asyncio.wait([stop, dead], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            dead.cancel()
            api.shutting_down = True
            if self.engine_dead.is_set():
                self.stage = "stopping"
                await self._finish_writes(api)
                return EXIT_ENGINE_DEAD
            self.stage = "draining"
            await self._drain(client)
            self.stage = "stopping"
            await self._finish_writes(api)
            return EXIT_OK
        finally:
            if self.stats_task is not None:
                self.stats_task.cancel()
            await runner.cleanup()
            await client.close(timeout_s=10)
            logger.info("Server stopped")

    async def _start_engine(self, engine_cls, tree):
        """(engine, tokenizer, files), or None when start-up failed or a signal came first."""
        from aphrodite.model_files import load_tokenizer, resolve_model

        loop = asyncio.get_running_loop()
        try:
            files = await loop.run_in_executor(None, resolve_model, self.config.model)
            engine = engine_cls(self.config)
        except Exception as exc:
            logger.error("Start-up failed: %s", exc)
            return None
        tree.track(engine.proc.pid)
        logger.info("Engine core process: pid %d; loading the model", engine.proc.pid)
        logger.info("Loading the tokenizer (a GGUF file's tokenizer is converted on first use: "
                    "a few seconds)")
        # The tokenizer loads here while the engine core loads the model.
        tokenizer_load = _in_daemon_thread(load_tokenizer, files, self.config.tokenizer)
        engine_ready = loop.run_in_executor(None, engine.wait_ready,
                                            self.options.engine_start_timeout_s)
        startup = asyncio.gather(tokenizer_load, engine_ready, return_exceptions=True)
        stop = asyncio.ensure_future(self.stop_requested.wait())
        await asyncio.wait([startup, stop], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        tree.snapshot()   # the workers exist by now (or never will)
        failures = [r for r in startup.result() if isinstance(r, BaseException)] \
            if startup.done() else []
        if not self.stop_requested.is_set() and not failures:
            tokenizer, ready = startup.result()
            logger.info("Engine ready: %s", ", ".join(
                f"{k}={v}" for k, v in dataclasses.asdict(ready).items()))
            return engine, tokenizer, files
        for failure in failures:
            logger.error("Start-up failed: %s", failure)
        # wait_ready may still be polling the engine's socket in its thread: end the engine
        # process so that it returns, and only then close the sockets. The tokenizer may
        # go on loading in its daemon thread; exiting does not wait for it.
        if engine.proc.is_alive():
            engine.proc.terminate()
        await asyncio.gather(engine_ready, return_exceptions=True)
        tree.snapshot()
        await loop.run_in_executor(None, engine.shutdown, 5)
        return None

    async def _start_http(self, engine, tokenizer, files, tree):
        from aphrodite.frontend.api_server import ApiServer
        from aphrodite.frontend.async_engine import AsyncEngineClient
        from aphrodite.frontend.metrics import ServerMetrics, StatsLogger
        from aphrodite.frontend.process_tree import gpu_memory_bytes
        from aphrodite.frontend.serving_base import ServingContext

        names = self.options.served_model_names or [files.name]
        metrics = ServerMetrics(names[0], engine.ready.max_model_len)
        kv_dtype = self.config.kv_cache_dtype
        metrics.set_cache_config(engine.ready.block_size, engine.ready.num_kv_blocks,
                                 engine.ready.dtype if kv_dtype == "auto" else kv_dtype,
                                 self.config.enable_prefix_caching)
        client = AsyncEngineClient(engine, tokenizer, metrics,
                                   log_requests=not self.options.disable_log_requests)
        metrics.frontend_requests.set_function(lambda: client.num_in_flight)
        client.start(on_dead=lambda reason: self.engine_dead.set())
        ctx = ServingContext(client=client, tokenizer=tokenizer, model_names=names,
                             chat_template=self.options.chat_template,
                             response_role=self.options.response_role,
                             max_logprobs=(self.config.max_logprobs
                                           if self.config.max_logprobs >= 0  # -1: no cap
                                           else engine.ready.vocab_size),
                             tokenizer_pool=ThreadPoolExecutor(1, thread_name_prefix="tokenizer"))
        api = ApiServer(ctx, self.options, metrics, model_root=files.name)
        runner = web.AppRunner(api.build_app(), handler_cancellation=True, access_log=None,
                               shutdown_timeout=2.0)
        await runner.setup()
        ssl_context = self._ssl_context()
        for sock in self.listen_sockets:
            await web.SockSite(runner, sock, ssl_context=ssl_context, shutdown_timeout=2.0).start()
        if not self.options.disable_log_stats:
            on_gpu = engine.ready.device.startswith("cuda")

            def memory() -> tuple[str, int]:
                used = gpu_memory_bytes(tree.pids()) if on_gpu else None
                return ("GPU", used) if used else ("CPU", tree.rss_bytes())

            stats = StatsLogger(metrics, memory, self.options.log_stats_interval_s)
            self.stats_task = asyncio.ensure_future(stats.run())
        scheme = "https" if self.options.ssl_certfile else "http"
        url = browser_url(scheme, self.options.host, self.options.port)
        logger.info("Serving %s on %s:%d: open %s in a browser for the playground; "
                    "OpenAI API at %sv1", ", ".join(names), self.options.host,
                    self.options.port, url, url)
        return client, api, runner

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.options.ssl_certfile:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.options.ssl_certfile, self.options.ssl_keyfile)
        return context

    async def _drain(self, client) -> None:
        """Let in-flight requests finish for the grace period, then abort the rest.

        The listener stays open meanwhile: new requests get an explicit 503 (the API's
        shutting_down gate) rather than a refused connection.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        grace = self.options.shutdown_timeout_s
        while client.num_in_flight and not self.hurry.is_set() and loop.time() < started + grace:
            await asyncio.sleep(0.05)
        if client.num_in_flight:
            waited = min(loop.time() - started, grace)
            logger.info("Aborting %d request(s) still running after %.1f s of the %.0f s grace "
                        "period%s", client.num_in_flight, waited, grace,
                        " (a second signal)" if self.hurry.is_set() else "")
            client.abort_all()

    @staticmethod
    async def _finish_writes(api) -> None:
        """Wait (bounded) until every handler has returned; the engine has already failed or
        aborted its requests, so each is only writing its final chunks. A client that reads
        slowly, or a loaded machine, can take well over a second for that."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FINAL_WRITES_TIMEOUT_S
        while api.active_handlers and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)   # aiohttp ends each response after its handler returns
        if api.active_handlers:
            logger.warning("%d handlers still writing after %.0f s; closing their connections",
                           api.active_handlers, FINAL_WRITES_TIMEOUT_S)


def _in_daemon_thread(fn, *args) -> asyncio.Future:
    """fn(*args) in a daemon thread. Unlike the default executor's threads, nothing joins it
    at exit, so a signal during start-up need not wait for a slow load to finish."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:   # the loop is closed: the server is exiting
            pass

    threading.Thread(target=run, name=f"load-{fn.__name__}", daemon=True).start()
    return future


def run_server(config: EngineConfig, options: ServerOptions) -> int:
    try:
        import uvloop
    except ImportError:  # Windows; uvloop is a dependency elsewhere
        return asyncio.run(Server(config, options).run())
    return uvloop.run(Server(config, options).run())


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    config, options = parse_args(argv)
    sys.exit(run_server(config, options))


if __name__ == "__main__":
    main()
