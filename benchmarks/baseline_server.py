"""A minimal OpenAI-compatible /v1/completions server around transformers' `generate`.

    python benchmarks/baseline_server.py --port 8100 --max-batch 1    # one request at a time
    python benchmarks/baseline_server.py --port 8100 --max-batch 64   # static batching

The serving benchmark's baseline: the same HTTP client and request mix as against our
server, so TTFT and TPOT mean the same thing on both sides. Batching is the plain static
kind people write around `generate`: when the model is free, every request that is waiting
(after a short collection window) becomes one left-padded batch, which runs until its
longest request is done; each response ends as soon as its own tokens are out, but new
requests wait for the whole batch. Tokens are streamed as `generate` makes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import threading
import time
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # aphrodite, when not installed


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    ignore_eos: bool
    loop: asyncio.AbstractEventLoop
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)  # ints, then None at the end

    def push(self, item) -> None:
        self.loop.call_soon_threadsafe(self.tokens.put_nowait, item)


class BatchStreamer:
    """transformers streamer for a batch: routes each row's new token to its job."""

    def __init__(self, jobs: list[Job], eos_id: int | None):
        self.jobs, self.sent, self.prompt_seen = jobs, [0] * len(jobs), False
        self.eos_id = eos_id

    def put(self, value) -> None:
        if not self.prompt_seen:           # the first call carries the prompts
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            job = self.jobs[row]
            if self.sent[row] < job.max_tokens:
                self.sent[row] += 1
                job.push(token)
                if token == self.eos_id and not job.ignore_eos:
                    self.sent[row] = job.max_tokens      # later rows of a finished row are pad
                if self.sent[row] == job.max_tokens:
                    job.push(None)

    def end(self) -> None:
        for row, job in enumerate(self.jobs):
            if self.sent[row] < job.max_tokens:     # the whole batch stopped early
                job.push(None)


class Generator:
    """Runs batches on one thread; the event loop only queues jobs and streams tokens."""

    def __init__(self, model, tokenizer, max_batch: int, max_batch_tokens: int,
                 window_s: float):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_batch_tokens, self.window_s = max_batch, max_batch_tokens, window_s
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.held: Job | None = None        # a job that did not fit the last batch
        threading.Thread(target=self._loop, daemon=True).start()

    def _next_batch(self) -> list[Job]:
        first = self.held or self.waiting.get()
        self.held, batch = None, [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            try:
                job = self.waiting.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            longest = max(len(j.prompt_ids) + j.max_tokens for j in batch + [job])
            if longest * (len(batch) + 1) > self.max_batch_tokens:
                self.held = job            # padded batch would be too large: next time
                break
            batch.append(job)
        return batch

    def _loop(self) -> None:
        import torch
        while True:
            batch = self._next_batch()
            width = max(len(j.prompt_ids) for j in batch)
            ids = torch.tensor([[self.pad] * (width - len(j.prompt_ids)) + j.prompt_ids
                                for j in batch])
            mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids)
                                 for j in batch])
            longest = max(j.max_tokens for j in batch)
            # EOS can only be ignored for the batch as a whole (min_new_tokens).
            min_new = longest if all(j.ignore_eos for j in batch) else 0
            streamer = BatchStreamer(batch, self.tokenizer.eos_token_id)
            try:
                with torch.inference_mode():
                    self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                        max_new_tokens=longest, min_new_tokens=min_new,
                                        pad_token_id=self.pad, streamer=streamer)
            except Exception as exc:     # report to every client, keep serving
                for job in batch:
                    job.push(exc)
                continue
            streamer.end()


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class App:
    def __init__(self, generator: Generator, tokenizer, model_name: str):
        self.gen, self.tokenizer, self.model_name = generator, tokenizer, model_name

    async def health(self, _):
        return web.Response(text="ok")

    async def models(self, _):
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "owned_by": "transformers"}]})

    async def completions(self, request: web.Request):
        body = await request.json()
        prompt = body.get("prompt", "")
        ids = prompt if isinstance(prompt, list) else \
            self.tokenizer.encode(prompt, add_special_tokens=False)
        max_tokens = int(body.get("max_tokens") or 16)
        ignore_eos = bool(body.get("ignore_eos")) or int(body.get("min_tokens") or 0) >= max_tokens
        job = Job(ids, max_tokens, ignore_eos, asyncio.get_running_loop())
        self.gen.waiting.put(job)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        chunk = lambda text, finish: {"id": rid, "object": "text_completion",
                                      "created": created, "model": self.model_name,
                                      "choices": [{"index": 0, "text": text,
                                                   "finish_reason": finish}]}
        if not body.get("stream"):
            out = [t async for t in self._tokens(job)]
            reply = chunk(self.tokenizer.decode(out), "length")
            reply["usage"] = usage(len(ids), len(out))
            return web.json_response(reply)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        out, text = [], ""
        async for token in self._tokens(job):
            out.append(token)
            full = self.tokenizer.decode(out)
            if not full.endswith("\ufffd"):      # hold back half a UTF-8 character
                await resp.write(sse(chunk(full[len(text):], None)))
                text = full
        finish = "length" if len(out) == max_tokens else "stop"
        await resp.write(sse(chunk(self.tokenizer.decode(out)[len(text):], finish)))
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(sse({"id": rid, "object": "text_completion", "choices": [],
                                  "usage": usage(len(ids), len(out))}))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    @staticmethod
    async def _tokens(job: Job):
        while (item := await job.tokens.get()) is not None:
            if isinstance(item, Exception):
                raise web.HTTPInternalServerError(text=repr(item))
            yield item


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def load(model: str | None, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM
    from aphrodite.model_files import load_tokenizer, resolve_model
    files = resolve_model(model)
    kwargs = {"gguf_file": files.gguf_file} if files.gguf_file else {}
    hf = AutoModelForCausalLM.from_pretrained(files.path, dtype=getattr(torch, dtype),
                                              **kwargs).eval()
    return hf, load_tokenizer(files), files.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2 GGUF")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--max-batch", type=int, default=64, help="1 = sequential")
    ap.add_argument("--max-batch-tokens", type=int, default=32768,
                    help="cap on batch size x (longest prompt + output), for memory")
    ap.add_argument("--batch-window-ms", type=float, default=20.0,
                    help="after the first waiting request, how long to collect more")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    model, tokenizer, name = load(args.model, args.dtype)
    gen = Generator(model, tokenizer, args.max_batch, args.max_batch_tokens,
                    args.batch_window_ms / 1e3 if args.max_batch > 1 else 0.0)
    app = App(gen, tokenizer, name)
    web_app = web.Application()
    web_app.add_routes([web.get("/health", app.health), web.get("/v1/models", app.models),
                        web.post("/v1/completions", app.completions)])
    web.run_app(web_app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
