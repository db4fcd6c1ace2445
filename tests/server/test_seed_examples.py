"""Every example of the user's guide (seed-usage.md) against the real server.

The examples are copied as written; only the host/port changes. The server is started
with `--served-model-name meta-llama/Llama-3.1-70B-Instruct ...`, which is how a user
serves their model under the name the guide uses. One deviation is forced by the OpenAI
SDK, not the server: `client.chat.completions.create()` only takes OpenAI's own keyword
arguments (it raises TypeError for `repetition_penalty=...`), so Aphrodite's extra
samplers go in `extra_body`, which the SDK sends as top-level JSON fields.
The generation examples run concurrently: the engine batches them.
"""

from __future__ import annotations

import functools
import io
import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from openai import OpenAI

from server_utils import E2E_MAX_MODEL_LEN, SEED_MODEL_NAME, shared_server

pytestmark = pytest.mark.slow   # starts the real server with the default model

CURL_EXAMPLES = {
    "chat_basic": """curl http://localhost:8083/v1/chat/completions \\
  -H "Content-Type: application/json" \\
  -d '{
    "model": "meta-llama/Llama-3.1-70B-Instruct",
    "messages": [
      {"role": "user", "content": "Write a short story about a dragon"}
    ],
    "temperature": 0.8,
    "max_tokens": 500
  }'""",
    "chat_advanced": """curl http://localhost:8083/v1/chat/completions \\
  -H "Content-Type: application/json" \\
  -d '{
    "model": "meta-llama/Llama-3.1-70B-Instruct",
    "messages": [
      {"role": "system", "content": "You are a creative storyteller."},
      {"role": "user", "content": "Tell me an epic fantasy tale"}
    ],
    "temperature": 0.9,
    "top_p": 0.95,
    "top_k": 40,
    "repetition_penalty": 1.15,
    "frequency_penalty": 0.1,
    "presence_penalty": 0.1,
    "min_p": 0.05,
    "typical_p": 0.95,
    "max_tokens": 1000
  }'""",
    "chat_streaming": """curl http://localhost:8083/v1/chat/completions \\
  -H "Content-Type: application/json" \\
  -d '{
    "model": "meta-llama/Llama-3.1-70B-Instruct",
    "messages": [{"role": "user", "content": "Write a poem"}],
    "stream": true,
    "temperature": 0.9
  }'""",
    "list_models": "curl http://localhost:8083/v1/models",
    "model_info": "curl http://localhost:8083/v1/models/meta-llama/Llama-3.1-70B-Instruct",
    "health": "curl http://localhost:8083/health",
}

PYTHON_EXAMPLES = {
    "sdk_basic_and_streaming": '''
response = client.chat.completions.create(
    model="meta-llama/Llama-3.1-70B-Instruct",
    messages=[
        {"role": "system", "content": "You are a creative writing assistant."},
        {"role": "user", "content": "Write a short sci-fi story."}
    ],
    temperature=0.85,
    max_tokens=800
)
print(response.choices[0].message.content)

# Streaming
stream = client.chat.completions.create(
    model="meta-llama/Llama-3.1-70B-Instruct",
    messages=[{"role": "user", "content": "Tell me a story"}],
    stream=True,
    temperature=0.9
)

for chunk in stream:
    if chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end='', flush=True)
''',
    "repetition_control": '''
response = client.chat.completions.create(
    model="meta-llama/Llama-3.1-70B-Instruct",
    messages=[{"role": "user", "content": "Write a dialogue"}],
    extra_body=dict(
    repetition_penalty=1.15,  # Reduce repetition (1.0 = off, >1.0 = penalize)
    ),
    frequency_penalty=0.1,    # Penalize frequent tokens
    presence_penalty=0.1      # Penalize tokens that appeared
)
''',
    "creative_sampling": '''
response = client.chat.completions.create(
    model="meta-llama/Llama-3.1-70B-Instruct",
    messages=[{"role": "user", "content": "Be creative!"}],
    temperature=0.95,    # Higher = more random
    top_p=0.95,         # Nucleus sampling
    extra_body=dict(
    min_p=0.05,         # Minimum probability threshold (Aphrodite)
    typical_p=0.95,     # Typical sampling (Aphrodite)
    top_k=40            # Top-k sampling
    ),
)
''',
    "logit_bias": '''
response = client.chat.completions.create(
    model="meta-llama/Llama-3.1-70B-Instruct",
    messages=[{"role": "user", "content": "Write something"}],
    logit_bias={
        "13": 5,   # Strongly encourage token 13
        "42": -5   # Strongly discourage token 42
    }
)
''',
    "role_play": '''
response = client.chat.completions.create(
    model="meta-llama/Llama-3.1-70B-Instruct",
    messages=[
        {"role": "system", "content": "You are a wise wizard named Gandalf."},
        {"role": "user", "content": "What advice do you have for me?"}
    ],
    temperature=0.85,
    extra_body=dict(
    repetition_penalty=1.2,
    ),
    max_tokens=300
)
''',
}


@pytest.fixture(scope="module")
def server():
    return shared_server()


def run_curl(server, command: str) -> str:
    command = command.replace("http://localhost:8083", server.base_url)
    done = subprocess.run(["bash", "-c", command + " --silent --show-error --fail-with-body"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


def run_python(server, code: str) -> tuple[dict, str]:
    # The guide's set-up lines, with the server's address.
    client = OpenAI(base_url=server.url_for("v1"), api_key="dummy", max_retries=0)
    out = io.StringIO()
    # The examples run in parallel threads, so each gets its own print instead of a
    # process-wide stdout redirection.
    namespace = {"client": client, "print": functools.partial(print, file=out)}
    exec(code, namespace)
    return namespace, out.getvalue()


@pytest.fixture(scope="module")
def results(server):
    """Run every generating example at once; the tests below check each result."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    with ThreadPoolExecutor(len(CURL_EXAMPLES) + len(PYTHON_EXAMPLES)) as pool:
        curl = {name: pool.submit(run_curl, server, cmd) for name, cmd in CURL_EXAMPLES.items()}
        python = {name: pool.submit(run_python, server, code)
                  for name, code in PYTHON_EXAMPLES.items()}
        return ({name: f.result() for name, f in curl.items()},
                {name: f.result() for name, f in python.items()})


def check_chat_completion(body: dict) -> None:
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == SEED_MODEL_NAME
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].strip()
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


@pytest.mark.parametrize("name", ["chat_basic", "chat_advanced"])
def test_curl_chat(results, name):
    check_chat_completion(json.loads(results[0][name]))


def test_curl_streaming(results):
    events = [line[len("data: "):] for line in results[0]["chat_streaming"].splitlines()
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == SEED_MODEL_NAME
               for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text.strip()
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_curl_models_and_health(results, server):
    models = json.loads(results[0]["list_models"])
    assert SEED_MODEL_NAME in [m["id"] for m in models["data"]]
    info = json.loads(results[0]["model_info"])
    assert info["id"] == SEED_MODEL_NAME and info["object"] == "model"
    assert info["max_model_len"] == E2E_MAX_MODEL_LEN
    assert results[0]["health"] == ""
    assert requests.get(server.url_for("health"), timeout=5).status_code == 200


def test_python_basic_and_streaming(results):
    namespace, printed = results[1]["sdk_basic_and_streaming"]
    content = namespace["response"].choices[0].message.content
    assert content.strip()
    # The first print is the non-streamed story, then the streamed one follows.
    assert printed.startswith(content + "\n")
    assert printed[len(content) + 1:].strip()


@pytest.mark.parametrize("name", ["repetition_control", "creative_sampling", "logit_bias",
                                  "role_play"])
def test_python_sampling_examples(results, name):
    response = results[1][name][0]["response"]
    assert response.model == SEED_MODEL_NAME
    assert response.choices[0].message.content.strip()
    assert response.choices[0].finish_reason in ("stop", "length")


def test_stats_line_in_log(results, server):
    # "Monitor Performance": the log (journal/stdout) shows the throughput line while busy.
    line = server.wait_for_log("Avg prompt throughput:", timeout_s=15)
    for part in ("Avg generation throughput:", "Running:", "Waiting:", "KV cache usage:",
                 "Prefix cache hit rate:"):
        assert part in line
    # The guide's "GPU memory usage: Z GB"; on a CPU-only machine the same figure for RAM.
    assert re.search(r"(GPU|CPU) memory usage: \d+\.\d\d GB", line), line
