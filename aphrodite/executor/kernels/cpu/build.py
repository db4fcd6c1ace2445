"""Building the CPU kernels with the system's g++, caching the build, and loading it.

cpu_kernels.cpp, the library's one translation unit, includes the kernel headers of this
folder and kernel_abi.h, which is generated from kernel_abi.py. build() writes that header
and compiles the library into <cache_root>/kernels/<key>/ (kernel_abi.h, cpu_kernels.so),
keyed by the sources, the header, the compiler's version, the flags (the target
architecture among them) and this CPU's feature flags, so a cache shared between machines
never hands one a build for another. The target architecture is -march=native unless asked
otherwise: tests/executor/kernels/test_cpu_builds.py also builds the AVX2 and portable
branches and checks them against the native build.

load_library() is what ops.py uses: APHRODITE_CPU_KERNELS=0 turns the kernels off, and no
compiler, a failed build or a library that does not match kernel_abi.py logs a warning and
returns None, so the torch paths stay in use.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

from aphrodite.executor.kernels.cpu import kernel_abi
from aphrodite.model_files import cache_root, write_file_atomically

logger = logging.getLogger("aphrodite.worker")

KERNELS = Path(__file__).parent
SOURCES = sorted([*KERNELS.glob("*.cpp"), *KERNELS.glob("*.h")])   # what the build key covers
LIBRARY = "cpu_kernels.so"


def flags(arch: str) -> list[str]:
    """g++'s flags for a build for -march=arch. gnu++17, not c++17: the strict ISO mode stops
    g++ from fusing multiply-adds. -Werror=missing-declarations: an entry point defined
    without kernel_abi.h's prototype does not build."""
    return ["-O3", f"-march={arch}", "-fopenmp", "-shared", "-fPIC", "-std=gnu++17",
            "-Werror=missing-declarations"]


def find_compiler() -> str | None:
    """$CXX, else the g++ on the PATH; None where there is none."""
    return os.environ.get("CXX") or shutil.which("g++")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build(compiler: str, arch: str = "native") -> Path:
    """The path of the library built for -march=arch, compiled now unless the cache has it.
    Raises CalledProcessError (stderr: the compiler's messages) or OSError."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             check=True).stdout
    header = kernel_abi.c_header()
    key = hashlib.sha256("\0".join([*(s.read_text() for s in SOURCES), header, version,
                                    " ".join(flags(arch)), _cpu_flags()]).encode()).hexdigest()
    folder = cache_root() / "kernels" / key[:32]
    target = folder / LIBRARY
    if target.exists():
        return target
    # The first start on a machine (or after an upgrade) is silent for this long otherwise.
    logger.info("Compiling the CPU kernels for -march=%s (once per machine and version: "
                "seconds to a minute)", arch)

    def compile_to(path: str) -> None:
        subprocess.run([compiler, *flags(arch), "-I", str(folder),
                        str(KERNELS / "cpu_kernels.cpp"), "-o", path],
                       capture_output=True, text=True, check=True)

    written = (write_file_atomically(folder / kernel_abi.HEADER,
                                     lambda path: Path(path).write_text(header))
               and write_file_atomically(target, compile_to))
    if not written:
        raise OSError(f"cannot write {folder}")
    logger.info("Built the CPU kernels for -march=%s into %s", arch, target)
    return target


def _errors(exc: OSError | subprocess.CalledProcessError) -> str:
    """What went wrong, briefly: the compiler's error lines (its warnings left out)."""
    stderr = getattr(exc, "stderr", "") or ""
    errors = [line for line in stderr.splitlines() if "error" in line]
    return "\n".join(errors or stderr.splitlines()[-5:])[:1000] or str(exc)


def load_library(arch: str = "native") -> ctypes.CDLL | None:
    """The kernels for -march=arch, built if need be and bound to kernel_abi.py's types; None
    (after a warning, except where APHRODITE_CPU_KERNELS=0) where they cannot be had."""
    if os.environ.get("APHRODITE_CPU_KERNELS", "1") == "0":
        return None
    cxx = find_compiler()
    if cxx is None:
        logger.warning("No C++ compiler (g++) found: CPU decode attention and quantised linears "
                       "run the slower torch paths")
        return None
    try:
        # torch has loaded its libgomp.so.1 already; the kernel's libgomp.so.1 resolves to it.
        # Each CDLL keeps its symbols to itself (RTLD_LOCAL), so builds for several
        # architectures can be loaded side by side.
        library = ctypes.CDLL(str(build(cxx, arch)))
        kernel_abi.bind(library)
    except (OSError, subprocess.CalledProcessError) as exc:
        logger.warning("Could not build the CPU kernels (%s): CPU decode attention and "
                       "quantised linears run the slower torch paths", _errors(exc))
        return None
    return library
