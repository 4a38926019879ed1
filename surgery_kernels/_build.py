"""Build and load the C++/CUDA extension in ``csrc/`` (once per process, lazily).

Sources: ``surgery_kernels/_csrc`` in a regular install (the wheel ships ``csrc/`` there), else
``<repo>/csrc`` of a source checkout or an editable install (``pip install -e .``), next to the
``surgery_kernels`` package. ``torch.utils.cpp_extension.load`` compiles them with ninja into a cache directory
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); an unchanged source tree is not
recompiled. The CUDA sources (``csrc/cuda/*.cu`` and ``csrc/cuda/*.cpp``) are added only when torch
was built with CUDA and a CUDA toolkit (nvcc and its headers) is found; otherwise only
``csrc/*.cpp`` is built. A CUDA build that fails is logged and followed by the CPU-only build, so
that the ``cpu`` backend does not depend on the CUDA toolchain (a CUDA torch on a machine without a
working toolkit is pip's default on Linux); the ``cuda`` backend then reports the CUDA error.

A failed build is remembered with the compiler's error as its reason: ``availability()`` reports
it, it is not retried in this process, and the ``torch`` backend keeps working. A failed CUDA build
is also remembered across processes, by a marker file in its build directory
(``cuda_build_failed.json``) that holds the error and a fingerprint of what the build used (sources,
torch, toolkit, compiler, flags): while the fingerprint matches, later processes build the CPU part
without retrying a CUDA compile that can take a minute to fail again (the whole CUDA build takes
55 s on a 2-core machine). A changed fingerprint, or ``python -m surgery_kernels build``
(``load(retry_cuda=True)``), tries the CUDA build again; a failure of the machine rather than the
build (a compiler killed for memory, a full disk) is not recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("surgery_kernels")

NAME = "surgery_kernels_ext"
# In the CUDA build's directory: the error of a CUDA build that failed, and what it was built from.
FAILED_MARKER = "cuda_build_failed.json"


def _source_dir() -> Path:
    """The C++/CUDA sources: the copy a regular install ships inside the package, else csrc/ of the
    checkout the package is imported from (source tree or editable install)."""
    here = Path(__file__).resolve().parent
    shipped = here / "_csrc"
    return shipped if shipped.is_dir() else here.parent / "csrc"


SOURCE_DIR = _source_dir()
# The GPUs the CUDA build always targets (H100/H200), besides the one present at build time.
CUDA_ARCHS = ("90",)


@dataclass
class BuildResult:
    ok: bool
    cuda: bool = False
    library: str = ""
    directory: str = ""
    sources: list[str] = field(default_factory=list)
    reason: str = ""
    cuda_reason: str = ""  # when ``ok`` but not ``cuda``: why the extension has no CUDA ops
    cuda_failed: bool = False  # the CUDA build was tried and failed (the CPU part was built alone)


_lock = threading.Lock()
_result: BuildResult | None = None


def cuda_toolkit() -> str | None:
    """The CUDA toolkit root when torch has CUDA and torch's CUDA_HOME has nvcc and the runtime
    headers, else None (``no_cuda_reason`` says which)."""
    return None if no_cuda_reason() else _cuda_home()


def _cuda_home() -> str | None:
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME


def no_cuda_reason() -> str:
    """Why the build would leave CUDA out, or "" when it would include it."""
    if torch.version.cuda is None:
        return "torch was built without CUDA"
    home = _cuda_home()
    if home is None:
        return "no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)"
    if not (Path(home) / "bin" / "nvcc").exists():
        return f"the CUDA toolkit at {home} (torch's CUDA_HOME) has no bin/nvcc: set CUDA_HOME to the toolkit's root"
    if not any((d / "cuda_runtime.h").is_file() for d in _cuda_include_dirs(home)):
        return (f"the CUDA toolkit at {home} (torch's CUDA_HOME) has no include/cuda_runtime.h: set CUDA_HOME to "
                "the toolkit's root (or CUDA_INC_PATH to its headers)")
    return ""


def _cuda_include_dirs(home: str) -> list[Path]:
    """Where a toolkit's runtime headers may be: CUDA_HOME/include (NVIDIA's installers, Debian's
    /usr), CUDA_INC_PATH (which torch's cpp_extension adds to the include paths), and
    CUDA_HOME/targets/<arch>/include (conda-forge's cuda-cudart-dev, whose nvcc finds them there).
    Finding one is enough to try the CUDA build: a build that then fails falls back to the CPU part."""
    dirs = [Path(home) / "include"]
    if os.environ.get("CUDA_INC_PATH"):
        dirs.append(Path(os.environ["CUDA_INC_PATH"]))
    dirs += sorted((Path(home) / "targets").glob("*/include"))
    return dirs


def sources(source_dir: Path, with_cuda: bool) -> list[Path]:
    found = sorted(source_dir.glob("*.cpp"))
    if with_cuda:
        found += sorted((source_dir / "cuda").glob("*.cpp")) + sorted((source_dir / "cuda").glob("*.cu"))
    return found


def _gencode_flags() -> list[str]:
    archs = list(CUDA_ARCHS)
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        archs.append(f"{major}{minor}")
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in dict.fromkeys(archs)]


def _openmp_flags() -> tuple[list[str], list[str]]:
    # ATen's at::parallel_for is an inline OpenMP region: without -fopenmp it would run on one
    # thread. torch ships libgomp.so.1, which the extension then shares (same soname).
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"], ["-fopenmp"]
    return [], []


def _build(source_dir: Path, verbose: bool, retry_cuda: bool = False) -> BuildResult:
    if not source_dir.is_dir():
        return BuildResult(False, reason=f"extension sources not found at {source_dir} (an install of "
                                         "surgery-kernels without its csrc/; reinstall from the repository)")
    cuda_reason = no_cuda_reason()
    if not cuda_reason and not any((source_dir / "cuda").glob("*.cu")):
        cuda_reason = f"no CUDA sources in {source_dir / 'cuda'}"
    failed = False
    if not cuda_reason:
        marker = _build_directory(source_dir, True, verbose) / FAILED_MARKER
        fingerprint = _cuda_fingerprint(source_dir)
        earlier = None if retry_cuda else _read_marker(marker, fingerprint)
        if earlier is not None:
            log.warning("surgery_kernels: the CUDA part of the extension failed to build in an earlier run with "
                        "the same sources and toolchain (%s); building the CPU part alone. `python -m "
                        "surgery_kernels build` tries the CUDA build again.", marker)
            failed, cuda_reason = True, (f"the CUDA part failed to build in an earlier run with the same sources "
                                         f"and toolchain (the CPU part was built alone; `python -m surgery_kernels "
                                         f"build` retries, {marker} records it): {earlier}")
        else:
            if retry_cuda:  # this attempt's error replaces the recorded one (_write_marker keeps a record)
                marker.unlink(missing_ok=True)
            result = _build_one(source_dir, True, verbose)
            if result.ok:
                marker.unlink(missing_ok=True)
                return result
            log.warning("surgery_kernels: the CUDA part of the extension failed to build; building the CPU part "
                        "alone: %s", result.reason)
            if not _transient(result.reason):
                _write_marker(marker, fingerprint, result.reason)
            failed, cuda_reason = True, ("the CUDA part failed to build (the CPU part was built alone): "
                                         + result.reason)
    result = _build_one(source_dir, False, verbose)
    result.cuda_reason, result.cuda_failed = cuda_reason, failed
    return result


def _cuda_fingerprint(source_dir: Path) -> str:
    """What a CUDA build's outcome depends on: the sources and headers (contents), this file (the
    flags and the build's logic), torch, the toolkit (CUDA_HOME, nvcc's file, the runtime headers
    found), the host compiler, ninja, and the environment variables that torch's cpp_extension,
    nvcc and the compilers read (PATH among them: another compiler or ninja first on it). A failed
    build is retried when any of them changes. Stable across processes: no ids or addresses."""
    h = hashlib.sha256()

    def add(*parts) -> None:
        for part in parts:
            h.update(repr(part).encode())
            h.update(b"\0")

    for f in sorted(source_dir.rglob("*")):
        if f.is_file() and f.suffix in (".cpp", ".cu", ".h", ".cuh", ".hpp"):
            add(str(f.relative_to(source_dir)))
            h.update(hashlib.sha256(f.read_bytes()).digest())
    h.update(hashlib.sha256(Path(__file__).read_bytes()).digest())
    home = _cuda_home() or ""
    add(torch.__version__, torch.version.cuda, home, _gencode_flags(), _openmp_flags())
    tools = [Path(home) / "bin" / "nvcc", shutil.which(os.environ.get("CXX", "c++")), shutil.which("ninja")]
    for f in tools + [d / "cuda_runtime.h" for d in _cuda_include_dirs(home)]:
        st = os.stat(f) if f and os.path.exists(f) else None
        add(str(f), st and (st.st_size, st.st_mtime_ns))
    add([(k, os.environ.get(k)) for k in _FINGERPRINT_ENV])
    return h.hexdigest()


_FINGERPRINT_ENV = ("PATH", "CXX", "CC", "CUDA_INC_PATH", "TORCH_CUDA_ARCH_LIST", "PYTORCH_NVCC", "NVCC_CCBIN",
                    "NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS", "CPATH", "LIBRARY_PATH", "MAX_JOBS")
# A failure of the machine, not of the build (a compiler killed for memory, a full disk): not recorded.
_TRANSIENT = ("Killed", "died with <Signals", "No space left on device", "Cannot allocate memory", "out of memory")


def _transient(reason: str) -> bool:
    return any(t in reason for t in _TRANSIENT)


def _read_marker(marker: Path, fingerprint: str) -> str | None:
    """The error recorded by an earlier failed CUDA build with this fingerprint, else None."""
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return None
    return str(record.get("reason", ""))


def _write_marker(marker: Path, fingerprint: str, reason: str) -> None:
    """Record a failed CUDA build (atomically: a reader sees the old record or the whole new one). A
    record of the same fingerprint is kept: processes that waited on torch's build lock while one
    of them compiled (torchrun ranks, workers) then fail to load the library, and their error is
    not the compiler's. A cache directory that cannot be written only costs the next process a
    retry."""
    if _read_marker(marker, fingerprint) is not None:
        return
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "reason": reason}))
        os.replace(tmp, marker)
    except OSError as exc:
        log.debug("could not record the failed CUDA build in %s: %s", marker, exc)
        tmp.unlink(missing_ok=True)


def _cache_name(source_dir: Path, with_cuda: bool) -> str:
    # One cache entry per source tree and torch build: two checkouts (or installs at one path in two
    # images with different torch) sharing TORCH_EXTENSIONS_DIR would otherwise rebuild over, or
    # load, each other's library.
    key = f"{source_dir.resolve()}|{torch.__version__}|{torch.version.cuda}"
    tag = hashlib.sha1(key.encode()).hexdigest()[:8]
    return f"{NAME}_{'cuda' if with_cuda else 'cpu'}_{tag}"


def _build_directory(source_dir: Path, with_cuda: bool, verbose: bool) -> Path:
    from torch.utils import cpp_extension

    return Path(cpp_extension._get_build_directory(_cache_name(source_dir, with_cuda), verbose))


def _build_one(source_dir: Path, with_cuda: bool, verbose: bool) -> BuildResult:
    from torch.utils import cpp_extension

    srcs = sources(source_dir, with_cuda)
    if not srcs:
        return BuildResult(False, reason=f"no C++ sources in {source_dir}")
    name = _cache_name(source_dir, with_cuda)
    build_dir = _build_directory(source_dir, with_cuda, verbose)
    omp_c, omp_l = _openmp_flags()
    kwargs = dict(
        name=name,
        sources=[str(s) for s in srcs],
        extra_cflags=["-O3"] + omp_c,
        extra_ldflags=omp_l,
        extra_include_paths=[str(source_dir)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
    if with_cuda:
        kwargs.update(with_cuda=True, extra_cuda_cflags=["-O3"] + _gencode_flags())
    try:
        cpp_extension.load(**kwargs)
    except Exception as exc:  # compiler errors come as RuntimeError/CalledProcessError with the log
        detail = str(exc).strip()
        out = getattr(exc, "output", None)
        if out:
            detail += "\n" + (out.decode(errors="replace") if isinstance(out, bytes) else str(out))
        return BuildResult(False, cuda=with_cuda, directory=str(build_dir), sources=[str(s) for s in srcs],
                           reason=f"building the extension in {build_dir} failed: {detail}")
    library = build_dir / f"{name}.so"
    return BuildResult(True, cuda=with_cuda, library=str(library), directory=str(build_dir),
                       sources=[str(s) for s in srcs])


def load(source_dir: Path | None = None, verbose: bool = False, retry_cuda: bool = False) -> BuildResult:
    """Build (or reuse the cached build of) the extension and load its ops into ``torch.ops.surgery``.

    Runs once per process: later calls return the first result, success or failure. ``retry_cuda``
    tries a CUDA build that an earlier process recorded as failed (see the module's docstring).
    """
    global _result
    if _result is not None:
        return _result
    with _lock:
        if _result is None:
            log.debug("building the surgery_kernels extension from %s", source_dir or SOURCE_DIR)
            _result = _build(Path(source_dir) if source_dir is not None else SOURCE_DIR,
                             verbose or bool(os.environ.get("SURGERY_KERNELS_VERBOSE_BUILD")), retry_cuda)
            if not _result.ok:
                log.warning("surgery_kernels: the C++ extension is unavailable: %s", _result.reason)
    return _result


def reset() -> None:
    """Forget the build result (tests only: the ops of a loaded library stay registered)."""
    global _result
    _result = None
