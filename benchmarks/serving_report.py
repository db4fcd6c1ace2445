"""Machine description and the result table of the serving benchmark."""

from __future__ import annotations

import os
import platform

INTERESTING_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
                     "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")


def machine_description() -> dict:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(),
            "flags": [f for f in INTERESTING_FLAGS if f in flags],
            "memory_gib": round(mem_gib, 1) if mem_gib else None,
            "python": platform.python_version()}
    try:
        import torch
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except ImportError:
        pass
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _ms(d: dict, key: str) -> str:
    v = d[key]
    return "-" if v is None else f"{v:.0f}"


def _decode(stats: dict) -> str:
    """Median per-request decode tok/s."""
    v = stats["decode_tok_s"]["p50"]
    return "-" if v is None else f"{v:.1f}"


def print_table(report: dict) -> None:
    m = report["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, {' '.join(m['flags'])}; torch {m.get('torch')}, "
          f"{report['threads']} threads, dtype {report['dtype']}")
    head = (f"{'workload':<14}{'conc':>5} {'backend':<26}{'reqs':>5}{'err':>4}{'tok/s':>8}"
            f"{'TTFT p50':>10}{'p99':>8}{'TPOT p50':>10}{'p99':>7}{'dec/s':>7}  ours/this")
    print(head)
    print("-" * len(head))
    order = {}                                   # workloads in the order they were run
    for run in report["runs"]:
        order.setdefault(run["workload"], len(order))
    for run in sorted(report["runs"], key=lambda r: (order[r["workload"]], r["concurrency"])):
        s = run["stats"]
        ratio = run.get("ours_over_this")
        note = f"{ratio:.2f}x" if ratio else ""
        if s["short_outputs"]:
            note += f" ({s['short_outputs']} short outputs)"
        if run.get("load_before") is not None and run["load_before"] > report["machine"]["cores"]:
            note += f" [load {run['load_before']:.1f}]"
        print(f"{run['workload']:<14}{run['concurrency']:>5} {run['backend']:<26}"
              f"{s['requests']:>5}{s['errors']:>4}{s['output_tok_s']:>8.1f}"
              f"{_ms(s['ttft_ms'], 'p50'):>10}{_ms(s['ttft_ms'], 'p99'):>8}"
              f"{_ms(s['tpot_ms'], 'p50'):>10}{_ms(s['tpot_ms'], 'p99'):>7}"
              f"{_decode(s):>7}  {note}")
        for err in s["error_samples"]:
            print(f"{'':>20}error: {err}")
    for line in report.get("notes", []):
        print(f"* {line}")


def print_memory(report: dict) -> None:
    """Each launched server's seconds to ready and RSS just before it was stopped: its model
    process (our workers; a baseline's only process) and its whole process tree."""
    servers = report.get("servers") or {}
    if not servers:
        return
    print("\nserver memory in MiB, read just before each server stopped (peak = VmHWM, which "
          "covers the model load;\ntree peak = sum of each process's peak):")
    head = (f"{'backend':<26}{'ready s':>8}{'model peak':>11}{'final':>8}{'anon':>8}{'file':>8}"
            f"{'tree peak':>11}{'final':>8}  processes")
    print(head)
    print("-" * len(head))
    for name, info in servers.items():
        mem = info.get("memory", {})
        model, tree = mem.get("model", {}), mem.get("tree", {})
        procs = ", ".join(f"{p['role']} {p['peak_mib']:.0f}" for p in mem.get("processes", []))
        ready = info.get("ready_s")
        print(f"{name:<26}{'-' if ready is None else f'{ready:.1f}':>8}"
              f"{model.get('peak_mib', 0):>11.0f}{model.get('rss_mib', 0):>8.0f}"
              f"{model.get('anon_mib', 0):>8.0f}{model.get('file_mib', 0):>8.0f}"
              f"{tree.get('peak_mib', 0):>11.0f}{tree.get('rss_mib', 0):>8.0f}  {procs}")
    for name, ratio in sorted(report.get("memory_ratios", {}).items()):
        print(f"  our model process's peak RSS / {name}'s: {ratio:.2f}x")
