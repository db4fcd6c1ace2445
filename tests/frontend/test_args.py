"""Command-line parsing into EngineConfig + ServerOptions."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from aphrodite.frontend.args import parse_args, parse_size
from server_utils import REPO_ROOT


def test_defaults():
    config, options = parse_args([])
    assert config.model is None                      # the bundled default model
    assert (options.host, options.port) == ("0.0.0.0", 2242)
    assert options.served_model_names == [] and options.api_keys == []
    assert config.enable_prefix_caching is True and config.enforce_eager is False


def test_engine_options_map_to_config(tmp_path):
    config, options = parse_args([
        "--model", "/models/x.gguf", "--max-model-len", "4096", "--dtype", "half",
        "--max-num-seqs", "8", "--max-num-batched-tokens", "512", "--block-size", "32",
        "--no-enable-prefix-caching", "--kv-cache-memory", "1.5GiB", "--gpu-memory-utilization",
        "0.8", "-tp", "2", "--enforce-eager", "--max-logprobs", "5", "--tokenizer", "tok",
        "--kv-cache-dtype", "float16"])
    assert config.model == "/models/x.gguf" and config.tokenizer == "tok"
    assert config.max_model_len == 4096 and config.dtype == "float16"
    assert (config.max_num_seqs, config.max_num_batched_tokens, config.block_size) == (8, 512, 32)
    assert config.enable_prefix_caching is False
    assert config.kv_cache_memory == int(1.5 * 2**30)
    assert config.gpu_memory_utilization == 0.8 and config.tensor_parallel_size == 2
    assert config.enforce_eager is True and config.max_logprobs == 5
    assert config.kv_cache_dtype == "float16" and parse_args([])[0].kv_cache_dtype == "auto"


def test_enforce_eager_takes_an_explicit_value():
    assert parse_args(["--enforce-eager", "false"])[0].enforce_eager is False
    assert parse_args(["--enforce-eager", "true"])[0].enforce_eager is True


def test_server_options(tmp_path, monkeypatch):
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    monkeypatch.setenv("APHRODITE_API_KEY", "env-key")
    _, options = parse_args([
        "--served-model-name", "meta-llama/Llama-3.1-70B-Instruct", "alias",
        "--api-keys", "k1", "k2", "--chat-template", str(template),
        "--allowed-origins", '["https://a.example"]', "https://b.example,https://c.example"])
    assert options.served_model_names == ["meta-llama/Llama-3.1-70B-Instruct", "alias"]
    assert options.api_keys == ["k1", "k2", "env-key"]
    assert options.chat_template == "{{ messages[0]['content'] }}"
    assert options.allowed_origins == ["https://a.example", "https://b.example", "https://c.example"]


def test_inline_chat_template_and_typo_path():
    assert parse_args(["--chat-template", "{{ x }}"])[1].chat_template == "{{ x }}"
    with pytest.raises(SystemExit):
        parse_args(["--chat-template", "no/such/template.jinja"])


@pytest.mark.parametrize("argv", [["--dtype", "int3"], ["--block-size", "0"],
                                  ["--gpu-memory-utilization", "1.5"],
                                  ["--ssl-keyfile", "k.pem"], ["--kv-cache-memory", "lots"],
                                  ["--kv-cache-dtype", "fp8"]])
def test_bad_values_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2


@pytest.mark.parametrize("text,expected", [("1024", 1024), ("4GiB", 4 << 30), ("512M", 512 << 20),
                                           ("2GB", 2 * 10**9), ("1.5k", 1536)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_nonsense():
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("4 bananas")


def test_positional_model_for_aphrodite_run():
    config, _ = parse_args(["my/model", "--port", "9000"], positional_model=True)
    assert config.model == "my/model"
    with pytest.raises(SystemExit):
        parse_args(["a", "--model", "b"], positional_model=True)


@pytest.mark.parametrize("command", [[sys.executable, "-m", "aphrodite.server", "--help"],
                                     [sys.executable, "-m", "aphrodite.cli", "run", "--help"]])
def test_help_documents_every_option(command):
    text = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                          check=True, timeout=60).stdout
    for flag in ["--model", "--host", "--port", "--served-model-name", "--api-keys",
                 "--max-model-len", "--dtype", "--tokenizer", "--chat-template", "--max-num-seqs",
                 "--max-num-batched-tokens", "--block-size", "--enable-prefix-caching",
                 "--no-enable-prefix-caching", "--kv-cache-memory", "--gpu-memory-utilization",
                 "--tensor-parallel-size", "--enforce-eager", "--max-logprobs",
                 "--disable-log-requests", "--disable-log-stats", "--ssl-keyfile",
                 "--ssl-certfile", "--allowed-origins"]:
        assert flag in text, flag


def test_tool_call_options():
    _, options = parse_args(["--tool-call-parser", "mistral", "--enable-auto-tool-choice"])
    assert (options.tool_call_parser, options.enable_auto_tool_choice) == ("mistral", True)
    _, plain = parse_args([])
    assert (plain.tool_call_parser, plain.enable_auto_tool_choice) == (None, False)


@pytest.mark.parametrize("argv,message", [
    (["--enable-auto-tool-choice"], "--enable-auto-tool-choice requires --tool-call-parser"),
    (["--tool-call-parser", "nope"], "invalid choice: 'nope'"),
])
def test_tool_call_options_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("command", [[sys.executable, "-m", "aphrodite.server", "--version"],
                                     [sys.executable, "-m", "aphrodite.cli", "--version"],
                                     [sys.executable, "-m", "aphrodite.cli", "run", "--version"]])
def test_version(command):
    import aphrodite

    out = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                         timeout=60).stdout
    assert out == f"aphrodite {aphrodite.__version__}\n"


def test_help_names_each_default_once_and_sizes_in_units():
    from aphrodite.frontend.args import build_parser

    text = build_parser("aphrodite").format_help()
    flat = re.sub(r"\s+", " ", text)
    for option in re.split(r"\n  (?=-)", text)[1:]:
        assert option.count("default:") <= 1, option
    assert "largest accepted request body; larger ones get 413 (default: 32MiB)" in flat
    assert "(default: None)" not in flat and "(default: False)" not in flat
    assert "engine seed for unseeded requests (default: 0)" in flat
    assert parse_args([])[1].max_request_body_bytes == 32 << 20


@pytest.mark.parametrize("num_bytes,text", [(32 << 20, "32MiB"), (1536, "1536"),
                                            (3 << 30, "3GiB"), (256 << 10, "256KiB")])
def test_format_size_round_trips(num_bytes, text):
    from aphrodite.frontend.args import format_size

    assert format_size(num_bytes) == text and parse_size(text) == num_bytes


def test_default_max_tokens_and_uncapped_logprobs():
    assert parse_args([])[1].default_max_tokens is None
    assert parse_args(["--default-max-tokens", "256"])[1].default_max_tokens == 256
    assert parse_args(["--max-logprobs", "-1"])[0].max_logprobs == -1
    for bad in (["--default-max-tokens", "0"], ["--max-logprobs", "-2"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
