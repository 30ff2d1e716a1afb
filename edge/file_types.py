"""Bundle file types and names, as data: the one table convert, edge and evaluate read.

A new quant type is a name in LM_QUANTS (llama-quantize's spelling; libllama does the work), a new
mmproj type a name in MMPROJ_TYPES plus its writer in convert/mmproj.py. Names are case-normalised
here, so `q4_k_m` and `Q4_K_M` are one type everywhere.
"""

from __future__ import annotations

from factedge.edge.errors import ConfigError

# language-model quant types offered (llama-quantize names); the first ones are the ones tests cover
LM_QUANTS = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q5_K_S", "Q4_K_S", "Q5_0", "Q5_1", "Q4_1",
             "Q3_K_M", "Q3_K_S", "Q3_K_L", "Q2_K", "F16", "BF16", "F32")
# the unquantized LM a conversion writes first (and quantizes from)
LM_BASE_TYPES = ("f32", "f16", "bf16")
# image encoder files: float types written directly, q8_0 through ggml's kernel
MMPROJ_TYPES = ("f32", "f16", "q8_0")
ADAPTER_TYPES = ("f32",)
# what a bundle opens when no type is named: small and faithful first
LM_PREFERENCE = ("Q4_K_M", "Q5_K_M", "Q8_0", "Q6_K", "Q4_0", "F16", "BF16", "F32")
MMPROJ_PREFERENCE = ("f16", "f32", "q8_0")
# image files `factedge ask --images FOLDER` picks up (by suffix, any case); edge/image.py decodes them
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def is_unquantized(dtype: str) -> bool:
    return dtype.lower() in LM_BASE_TYPES


def lm_quant(name: str) -> str:
    """A quant type in its canonical spelling, or ConfigError listing the known ones."""
    norm = name.strip().upper()
    if norm not in LM_QUANTS:
        raise ConfigError(f"unknown quant type {name!r}; known: {', '.join(LM_QUANTS)}")
    return norm


def lm_base_type(name: str) -> str:
    norm = name.strip().lower()
    if norm not in LM_BASE_TYPES:
        raise ConfigError(f"base type must be one of {', '.join(LM_BASE_TYPES)}, not {name!r}")
    return norm


def mmproj_type(name: str) -> str:
    norm = name.strip().lower()
    if norm not in MMPROJ_TYPES:
        raise ConfigError(f"unknown mmproj type {name!r}; known: {', '.join(MMPROJ_TYPES)}")
    return norm


def base_model_file(base_type: str) -> str:
    """model-f16.gguf: the unquantized LM, its type in lower case."""
    return f"model-{lm_base_type(base_type)}.gguf"


def quant_model_file(quant: str) -> str:
    """model-Q4_K_M.gguf: a quantized LM, llama-quantize's spelling (F16 as a quant is model-F16.gguf)."""
    return f"model-{lm_quant(quant)}.gguf"


def mmproj_file(dtype: str) -> str:
    return f"mmproj-{mmproj_type(dtype)}.gguf"


def adapter_file(dtype: str = "f32") -> str:
    if dtype.lower() not in ADAPTER_TYPES:
        raise ConfigError(f"adapter type must be one of {', '.join(ADAPTER_TYPES)}, not {dtype!r}")
    return f"adapter-{dtype.lower()}.gguf"
