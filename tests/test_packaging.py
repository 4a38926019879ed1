"""The wheel: every package of the tree, and csrc/ inside it as surgery_kernels/_csrc, so that a
regular (non-editable) install finds the extension's sources."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _listed_packages() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def test_package_list_covers_the_tree():
    """pyproject lists its packages (it maps csrc/ into one): a new subpackage must be listed."""
    found = {".".join(p.parent.relative_to(ROOT).parts) for top in ("surgery_kernels", "surgery")
             for p in (ROOT / top).rglob("__init__.py") if "__pycache__" not in p.parts}
    assert _listed_packages() == found | {"surgery_kernels._csrc", "surgery_kernels._csrc.cuda"}


def test_wheel_ships_the_extension_sources(tmp_path):
    """The wheel built from this tree holds every C++/CUDA source under surgery_kernels/_csrc and
    the packages' py.typed markers, and the installed package reads its sources from there (not
    from a checkout)."""
    pytest.importorskip("setuptools")  # the build backend, without build isolation (no index needed)
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ and egg-info there
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("csrc", "surgery_kernels", "surgery"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("surgery_kernels-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = [p.relative_to(ROOT / "csrc").as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()]
    assert sources and {f"surgery_kernels/_csrc/{s}" for s in sources} <= names
    # PEP 561 markers: without them a type checker ignores the packages' annotations in user code
    assert {"surgery_kernels/py.typed", "surgery/py.typed"} <= names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    out = subprocess.run([sys.executable, "-c", "import surgery_kernels._build as b; print(b.SOURCE_DIR)"],
                         capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": ""},
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == site / "surgery_kernels" / "_csrc"


def test_version_is_the_same_in_pyproject_and_the_package():
    """`--version`, `info` and the wheel's metadata say one version: pyproject's and
    surgery_kernels.__version__ are kept in step by hand."""
    import surgery_kernels

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == surgery_kernels.__version__
