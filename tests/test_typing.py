"""What a user's type checker sees of the public API (the packages ship py.typed): the loss
functions' results (a tensor, or (loss, values) with return_values=True), typed arguments, and
hf.patch / hf.unpatch returning the model's own type. mypy checks a small user program."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("mypy")

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = textwrap.dedent("""
    import torch
    from surgery_kernels import LinearCrossEntropy, hf, linear_cross_entropy, linear_kl_div

    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    reveal_type(linear_cross_entropy(h, w, t))
    reveal_type(linear_cross_entropy(h, w, t, reduction="none", return_values=True))
    reveal_type(linear_kl_div(h, w, h, w, mask=t))
    reveal_type(linear_kl_div(h, w, h, w, return_values=True))
    flag: bool = bool(t.numel())
    reveal_type(linear_cross_entropy(h, w, t, return_values=flag))

    class Model(torch.nn.Module):
        pass

    reveal_type(hf.patch(Model(), "torch"))
    reveal_type(hf.unpatch(Model()))
    reveal_type(hf.token_nll(Model(), labels=t))
    LinearCrossEntropy(softcap=30.0, backend="torch")

    linear_cross_entropy(h, w, t, softcap="30")  # wrong: a string
    linear_kl_div(h, w, h, w, temperature=None)  # wrong: None
    linear_cross_entropy(h, w, t.tolist())  # wrong: a list
""")

EXPECTED_TYPES = [
    "torch._tensor.Tensor",
    "tuple[torch._tensor.Tensor, torch._tensor.Tensor]",
    "torch._tensor.Tensor",
    "tuple[torch._tensor.Tensor, torch._tensor.Tensor]",
    "torch._tensor.Tensor | tuple[torch._tensor.Tensor, torch._tensor.Tensor]",  # mypy 1.11 spells it Union[...]
    "test_user.Model",
    "test_user.Model",
    "torch._tensor.Tensor",
]


def _new_spelling(t: str) -> str:
    """Older mypy spells a union Union[A, B] (a two-member one only here) and tuples Tuple[...]."""
    t = t.replace("Tuple[", "tuple[")
    if t.startswith("Union[torch._tensor.Tensor, "):
        t = "torch._tensor.Tensor | " + t[len("Union[torch._tensor.Tensor, "):-1]
    return t


def test_user_program_types(tmp_path):
    program = tmp_path / "test_user.py"
    program.write_text(PROGRAM)
    # The source tree on MYPYPATH: an editable install's import hook is invisible to mypy.
    env = {**os.environ, "MYPYPATH": str(ROOT)}
    # --follow-imports=silent: the annotations of the imported packages are used, but only the
    # user's program is reported on.
    out = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent", "--no-error-summary",
                          "--cache-dir", str(tmp_path / "cache"), "--hide-error-context", str(program)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    lines = out.stdout.splitlines()
    revealed = [_new_spelling(m.group(1)) for line in lines if (m := re.search(r'Revealed type is "(.*)"', line))]
    assert revealed == EXPECTED_TYPES, out.stdout + out.stderr
    wrong = {int(line.split(":")[1]) for line in lines if ": error:" in line}
    expected_wrong = {i for i, line in enumerate(PROGRAM.splitlines(), 1) if "# wrong" in line}
    assert wrong == expected_wrong, out.stdout + out.stderr
