"""Command-line options of the server: one parser, split into EngineConfig + ServerOptions."""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field

from aphrodite import __version__
from aphrodite.config import EngineConfig
from aphrodite.frontend.tool_parsers import TOOL_PARSERS

DEFAULT_PORT = 2242
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_QUEUE_LEN = 1024
DEFAULT_MAX_N = 16
DEFAULT_MAX_STOP_SEQUENCES = 32     # SillyTavern sends one per character name and more
DEFAULT_MAX_STOP_LENGTH = 256
DEFAULT_MAX_LOG_LEN = 1024

_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 10**3, "m": 1 << 20,
               "mib": 1 << 20, "mb": 10**6, "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
               "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}


@dataclass
class ServerOptions:
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    served_model_names: list[str] = field(default_factory=list)  # empty = the model's name
    api_keys: list[str] = field(default_factory=list, repr=False)   # never in a log line
    chat_template: str | None = None      # template text (a file given on the CLI is read)
    response_role: str = "assistant"
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    allowed_origins: list[str] = field(default_factory=list)
    disable_log_requests: bool = False
    disable_log_stats: bool = False
    log_stats_interval_s: float = 5.0
    max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_timeout_s: float = 10.0
    engine_start_timeout_s: float = 600.0
    # Admission control: sequences in flight beyond the engine's batch (max_num_seqs, copied
    # from the engine options) are waiting; more than max_queue_len waiting -> 503.
    max_num_seqs: int = 256
    max_queue_len: int = DEFAULT_MAX_QUEUE_LEN
    # Per-request caps (400 naming the limit).
    max_n: int = DEFAULT_MAX_N
    max_stop_sequences: int = DEFAULT_MAX_STOP_SEQUENCES
    max_stop_length: int = DEFAULT_MAX_STOP_LENGTH
    max_log_len: int = DEFAULT_MAX_LOG_LEN     # characters of a request's log line
    # Tool calling: the parser that finds calls in free text (tool_choice "auto").
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    # max_tokens of a request that omits it; None: chat runs to the end of the context and
    # completions generate 16 tokens (OpenAI's defaults).
    default_max_tokens: int | None = None


def parse_size(text: str) -> int:
    """'4GiB', '512M', '2GB' or plain bytes -> bytes (K/M/G and KiB/MiB/GiB are binary)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4GiB, 512MiB or bytes)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def format_size(num_bytes: int) -> str:
    """Bytes in the largest binary unit that divides them: 33554432 -> '32MiB'."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= scale and num_bytes % scale == 0:
            return f"{num_bytes // scale}{unit}"
    return str(num_bytes)


class _HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help, unless its text names the default already or
    there is no value to name (None, off, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default is None
                or default is False or default == [] or default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".strip()


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _max_logprobs(text: str) -> int:
    value = int(text)
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be >= 0, or -1 for no limit, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _origins(values: list[str]) -> list[str]:
    """--allowed-origins as a JSON list (vLLM style), comma-separated text or several values."""
    origins: list[str] = []
    for value in values:
        value = value.strip()
        if value.startswith("["):
            origins.extend(json.loads(value))
        else:
            origins.extend(part.strip() for part in value.split(",") if part.strip())
    return origins


def _read_chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:  # neither a file nor a Jinja template: most likely a typo'd path
        raise SystemExit(f"--chat-template: {value!r} is neither a file nor a Jinja template")
    return value


def build_parser(prog: str, positional_model: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=_HelpFormatter,
        description="OpenAI-compatible inference server with Aphrodite's extended samplers.")
    p.add_argument("--version", action="version", version=f"aphrodite {__version__}")
    model_help = ("HF model folder, a .gguf file or a hub id; default: the bundled "
                  "SmolLM2-135M-Instruct GGUF")
    if positional_model:
        p.add_argument("model_positional", nargs="?", metavar="MODEL", help=model_help)
    p.add_argument("--model", default=None, help=model_help)

    srv = p.add_argument_group("server")
    srv.add_argument("--host", default="0.0.0.0", help="address to listen on")
    srv.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    srv.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                     help="names clients may send as `model`; the first is used in responses "
                          "and metrics (default: the --model value, or the default model's name)")
    srv.add_argument("--api-keys", nargs="+", default=None, metavar="KEY",
                     help="accepted API keys (Bearer or x-api-key header); also "
                          "$APHRODITE_API_KEY (comma-separated). /health, /metrics, /version "
                          "and /openapi.json stay open")
    srv.add_argument("--launch-kobold-api", action="store_true",
                     help="accepted for Aphrodite's command lines: the KoboldAI API "
                          "(/api/v1, /api/extra) is always served")
    srv.add_argument("--chat-template", default=None,
                     help="chat template file or inline Jinja text (default: the tokenizer's)")
    srv.add_argument("--response-role", default="assistant",
                     help="role of the generated chat message")
    srv.add_argument("--ssl-keyfile", default=None, help="TLS private key file")
    srv.add_argument("--ssl-certfile", default=None, help="TLS certificate file")
    srv.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                     help='CORS origins: "*", a JSON list or comma-separated origins '
                          "(default: no CORS headers)")
    srv.add_argument("--disable-log-requests", action="store_true",
                     help="do not log a line per request")
    srv.add_argument("--disable-log-stats", action="store_true",
                     help="do not log the throughput/KV-cache stats line (every 5 seconds "
                          "while busy)")
    srv.add_argument("--max-request-body", type=parse_size,
                     default=format_size(DEFAULT_MAX_BODY_BYTES),
                     metavar="SIZE", help="largest accepted request body; larger ones get 413")
    srv.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="SECONDS",
                     help="on SIGTERM/SIGINT, how long in-flight requests may run before they "
                          "are aborted")

    tools = p.add_argument_group("tool calling")
    tools.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                       help="how the model writes tool calls (hermes: Qwen2.5/Hermes "
                            "<tool_call> tags; llama3_json: Llama 3.1+ JSON; mistral: "
                            "[TOOL_CALLS]); needed for tool_choice \"auto\"")
    tools.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="let the model decide whether to call a tool (tool_choice "
                            "\"auto\", the default when a request has tools); requires "
                            "--tool-call-parser")

    lim = p.add_argument_group("limits")
    lim.add_argument("--max-queue-len", type=_non_negative, default=DEFAULT_MAX_QUEUE_LEN,
                     metavar="N", help="most sequences that may wait for a batch slot (in flight "
                     "beyond --max-num-seqs); more get 503 with Retry-After")
    lim.add_argument("--default-max-tokens", type=_positive, default=None, metavar="N",
                     help="max_tokens of requests that omit it (default: chat runs to the end "
                          "of the context, completions stop after 16 tokens, as in OpenAI's "
                          "API); a request's own max_tokens is never changed")
    lim.add_argument("--max-n", type=_positive, default=DEFAULT_MAX_N,
                     help="largest `n` (choices per request)")
    lim.add_argument("--max-stop-sequences", type=_non_negative,
                     default=DEFAULT_MAX_STOP_SEQUENCES, metavar="N",
                     help="most stop strings per request")
    lim.add_argument("--max-stop-length", type=_positive, default=DEFAULT_MAX_STOP_LENGTH,
                     metavar="CHARS", help="longest stop string")
    lim.add_argument("--max-log-len", type=_non_negative, default=DEFAULT_MAX_LOG_LEN,
                     metavar="CHARS", help="request log lines are cut to this many characters")

    eng = p.add_argument_group("engine")
    eng.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id "
                     "(default: the model's own)")
    eng.add_argument("--dtype", default="auto",
                     choices=["auto", "half", "float16", "bfloat16", "float", "float32"],
                     help="weight and activation dtype (auto: bfloat16/float16 on GPU, float32 on CPU)")
    eng.add_argument("--quantization", default="auto", choices=["auto", "none", "int4"],
                     help="GGUF models on CPU: int4 keeps Q4/Q8_0 weights quantised only "
                          "(least memory); auto also keeps a float32 copy, used for prefill "
                          "and large batches (quantised kernels for small decode steps); "
                          "none: float32 only")
    eng.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="where the model runs (auto: CUDA when a GPU is visible, else CPU)")
    eng.add_argument("--max-model-len", type=int, default=None,
                     help="longest prompt + output in tokens (default: from the model config)")
    eng.add_argument("--max-num-seqs", type=int, default=256,
                     help="most sequences in one batch")
    eng.add_argument("--max-num-batched-tokens", type=int, default=2048,
                     help="token budget of one engine step (prefill chunks + decodes)")
    eng.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    eng.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                     default=True, help="reuse KV blocks of identical prompt prefixes")
    eng.add_argument("--kv-cache-memory", type=parse_size, default=None, metavar="SIZE",
                     help="KV-cache pool size on CPU, e.g. 2GiB (default: a share of free RAM)")
    eng.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float16"],
                     help="KV-cache element type (auto: the model's dtype). float16 on CPU "
                          "halves the cache's memory and speeds up long-context attention; "
                          "keys and values are rounded to float16, so greedy output can differ "
                          "from the float32 model's")
    eng.add_argument("--num-kv-blocks", type=int, default=None,
                     help="fixed number of KV blocks, overriding the memory-based size")
    eng.add_argument("--gpu-memory-utilization", type=float, default=0.90,
                     help="share of GPU memory the engine may use (weights + activations + KV)")
    eng.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                     help="number of GPUs (or CPU worker processes) to shard the model over")
    eng.add_argument("--enforce-eager", nargs="?", const=True, default=False, type=parse_bool,
                     help="disable CUDA graphs (GPU); takes an optional true/false")
    eng.add_argument("--max-logprobs", type=_max_logprobs, default=20,
                     help="largest logprobs / top_logprobs a request may ask for; -1: no limit")
    eng.add_argument("--seed", type=int, default=0, help="engine seed for unseeded requests")
    eng.add_argument("--num-threads", type=int, default=None,
                     help="torch threads per CPU worker (default: cores / workers)")
    return p


_DTYPES = {"half": "float16", "float": "float32"}


def parse_args(argv: list[str] | None = None, prog: str = "python -m aphrodite.server",
               positional_model: bool = False) -> tuple[EngineConfig, ServerOptions]:
    parser = build_parser(prog, positional_model)
    a = parser.parse_args(argv)
    model = a.model
    if positional_model and a.model_positional is not None:
        if model is not None and model != a.model_positional:
            parser.error("give the model either as MODEL or as --model, not both")
        model = a.model_positional
    try:
        config = EngineConfig(
            model=model, tokenizer=a.tokenizer, dtype=_DTYPES.get(a.dtype, a.dtype),
            quantization=a.quantization,
            device=a.device, max_model_len=a.max_model_len, block_size=a.block_size,
            kv_cache_memory=a.kv_cache_memory, kv_cache_dtype=a.kv_cache_dtype,
            gpu_memory_utilization=a.gpu_memory_utilization,
            num_kv_blocks=a.num_kv_blocks, max_num_seqs=a.max_num_seqs,
            max_num_batched_tokens=a.max_num_batched_tokens,
            enable_prefix_caching=a.enable_prefix_caching,
            tensor_parallel_size=a.tensor_parallel_size, enforce_eager=a.enforce_eager,
            num_threads=a.num_threads, seed=a.seed, max_logprobs=a.max_logprobs)
    except ValueError as exc:
        parser.error(str(exc))
    if not 0 < a.gpu_memory_utilization <= 1:
        parser.error("--gpu-memory-utilization must be in (0, 1]")
    if (a.ssl_keyfile is None) != (a.ssl_certfile is None):
        parser.error("--ssl-keyfile and --ssl-certfile go together")
    if a.enable_auto_tool_choice and a.tool_call_parser is None:
        parser.error("--enable-auto-tool-choice requires --tool-call-parser")
    api_keys = list(a.api_keys or [])
    env_keys = os.environ.get("APHRODITE_API_KEY", "")
    api_keys += [k.strip() for k in env_keys.split(",") if k.strip()]
    options = ServerOptions(
        host=a.host, port=a.port, served_model_names=list(a.served_model_name or []),
        api_keys=api_keys, chat_template=_read_chat_template(a.chat_template),
        response_role=a.response_role, ssl_keyfile=a.ssl_keyfile, ssl_certfile=a.ssl_certfile,
        allowed_origins=_origins(a.allowed_origins),
        disable_log_requests=a.disable_log_requests, disable_log_stats=a.disable_log_stats,
        max_request_body_bytes=a.max_request_body, shutdown_timeout_s=a.shutdown_timeout,
        max_num_seqs=a.max_num_seqs, max_queue_len=a.max_queue_len, max_n=a.max_n,
        max_stop_sequences=a.max_stop_sequences, max_stop_length=a.max_stop_length,
        max_log_len=a.max_log_len, tool_call_parser=a.tool_call_parser,
        enable_auto_tool_choice=a.enable_auto_tool_choice,
        default_max_tokens=a.default_max_tokens)
    return config, options
