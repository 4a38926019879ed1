"""Compile check of the CUDA sources in ``csrc/cuda`` (CI has nvcc but no GPU and a CPU torch).

- every ``*.cu`` is compiled with nvcc for sm_90 with the flags torch's extension builder gives
  nvcc (no implicit half/bf16 conversions), so a syntax or type error fails CI;
- the object defines the launchers declared in ``rows.h`` with the declared signatures (a
  mismatch would otherwise only show as an undefined symbol when the extension loads on a GPU);
- every ``*.cpp`` (the ``TORCH_LIBRARY_IMPL(surgery, CUDA)`` side) is compiled with the host
  compiler against torch's and the toolkit's headers (``-fsyntax-only``: linking needs a CUDA
  torch), as the real build compiles it, in C++17 and C++20;
- a deliberately broken ``.cu`` must fail, so this check cannot pass vacuously.

Skips, saying why, only when nvcc or the toolkit headers are absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_ext

ROOT = Path(__file__).resolve().parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_SRC.glob("*.cu"))
CPP_FILES = sorted(CUDA_SRC.glob("*.cpp"))


def _cuda_home() -> Path | None:
    """The toolkit root: CUDA_HOME / CUDA_PATH, torch's guess, then the usual place."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_ext.CUDA_HOME, "/usr/local/cuda"]
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c)
    return None


CUDA_HOME = _cuda_home()
NVCC = (str(CUDA_HOME / "bin" / "nvcc") if CUDA_HOME and (CUDA_HOME / "bin" / "nvcc").is_file()
        else shutil.which("nvcc"))
pytestmark = pytest.mark.skipif(
    NVCC is None or CUDA_HOME is None,
    reason="nvcc or the CUDA toolkit headers not found (set CUDA_HOME or put nvcc on PATH)")

# What torch.utils.cpp_extension passes to nvcc for every extension (mirrored so that code relying
# on implicit half/bf16 conversions fails here as it would in the real build).
NVCC_TORCH_FLAGS = list(getattr(cpp_ext, "COMMON_NVCC_FLAGS", [
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]))
# A CPU torch has no generated c10/cuda/impl/cuda_cmake_macros.h; this define skips it.
NO_CMAKE_CONFIG = "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"


def _includes() -> list[str]:
    dirs = [*cpp_ext.include_paths(), str(CUDA_HOME / "include"), str(CUDA_SRC)] if CUDA_HOME else []
    return [f"-I{d}" for d in dirs]


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _nvcc(src: Path, obj: Path, std: str = "c++20") -> subprocess.CompletedProcess:
    return _run([NVCC, "-c", str(src), "-o", str(obj), f"-std={std}", "-gencode=arch=compute_90,code=sm_90",
                 *NVCC_TORCH_FLAGS, NO_CMAKE_CONFIG, "-Xcompiler", "-fPIC", *_includes()])


def _describe(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


def test_there_are_cuda_sources():
    assert CU_FILES, f"no .cu files under {CUDA_SRC}"
    assert CPP_FILES, f"no .cpp files under {CUDA_SRC}"


@pytest.mark.parametrize("src", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(src, tmp_path):
    obj = tmp_path / (src.stem + ".o")
    proc = _nvcc(src, obj)
    assert proc.returncode == 0, _describe(proc)
    assert obj.is_file()
    if src.name == "rows.cu" and shutil.which("nm"):
        symbols = _run(["nm", "-C", "--defined-only", str(obj)]).stdout
        for fn, args in (("launch_ce_rows", "CeRowsArgs"), ("launch_kl_rows", "KlRowsArgs")):
            sig = f"surgery_cuda::{fn}(surgery_cuda::{args} const&, CUstream_st*)"
            assert sig in symbols, f"{src.name} does not define {sig} as declared in rows.h"


@pytest.mark.parametrize("std", ["c++17", "c++20"])
@pytest.mark.parametrize("src", CPP_FILES, ids=lambda p: p.name)
def test_host_compiler_compiles(src, std):
    cxx = os.environ.get("CXX", "c++")
    proc = _run([cxx, "-fsyntax-only", f"-std={std}", "-Wall", NO_CMAKE_CONFIG, "-DTORCH_API_INCLUDE_EXTENSION_H",
                 *_includes(), str(src)])
    assert proc.returncode == 0, _describe(proc)


def test_nvcc_rejects_a_syntax_error(tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text('#include "rows.h"\n__global__ void k(float* x) { x[threadIdx.x] = 1.0f }\n')
    proc = _nvcc(bad, tmp_path / "bad.o")
    assert proc.returncode != 0
    assert "error" in (proc.stdout + proc.stderr)
