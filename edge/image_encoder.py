"""The CLIP encoder + projector of an mmproj GGUF, through libmtmd: RGB pixels in, embeddings out.

Split from edge/runtime.py (same OwnedHandle base: checked pointers, one free, ClosedError after close):
the model, context and adapter are libllama's, this is libmtmd's. The mmproj is checked by
edge.gguf_preflight before libmtmd sees it (a damaged tensor name would otherwise crash at the first image).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from factedge.edge.errors import InputError, NativeError
from factedge.edge.gguf_preflight import preflight
from factedge.edge.owned_handle import OwnedHandle
from factedge.edge.runtime import Model, native_log_tail, require_file
from factedge.edge.threadpool import usable_cpus

import llama_cpp.mtmd_cpp as mtmd  # noqa: E402,I001  (bound to our libraries by edge.runtime's import)


class ImageEncoder(OwnedHandle):
    """The CLIP encoder + projector of an mmproj GGUF, through libmtmd."""

    def __init__(self, mmproj: Path, model: Model, *, use_gpu: bool = False, n_threads: int = 0,
                 flash_attn: bool | None = None):
        self.path = require_file(mmproj, "mmproj GGUF")
        preflight(self.path, "mmproj")
        model_ptr = model.ptr  # ClosedError for a closed model, before anything is allocated
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.print_timings = False
        params.warmup = False
        if flash_attn is not None:  # None: llama.cpp decides; False for exact parity checks
            params.flash_attn_type = int(flash_attn)
        # mtmd's default is 4 threads whatever the machine: on 2 CPUs that oversubscribes every barrier
        params.n_threads = n_threads if n_threads > 0 else min(params.n_threads, usable_cpus())
        ptr = mtmd.mtmd_init_from_file(str(self.path).encode(), model_ptr, params)
        if not ptr:
            raise InputError(f"llama.cpp cannot load this mmproj with {model.path.name} ({native_log_tail()})", self.path)
        self.model = model
        self._own(ptr)

    def _free(self) -> None:
        mtmd.mtmd_free(self._ptr)

    def _depends_on(self):
        return (self.model,)

    def encode(self, rgb: np.ndarray) -> np.ndarray:
        """Embeddings [n_tokens, n_embd] of one RGB uint8 image (already prepared to model size)."""
        self._live()
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise InputError(f"expected an HxWx3 uint8 image, got shape {rgb.shape}")
        h, w = rgb.shape[:2]
        data = rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        bitmap = mtmd.mtmd_bitmap_init(w, h, data)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            marker = mtmd.mtmd_default_marker()
            text = mtmd.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc = mtmd.mtmd_tokenize(self._ptr, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                raise NativeError(f"mtmd_tokenize failed with {rc} ({native_log_tail()})", self.path)
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue
                n_tok = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                if mtmd.mtmd_encode_chunk(self._ptr, chunk) != 0:
                    raise NativeError(f"image encoding failed ({native_log_tail()})", self.path)
                ptr = mtmd.mtmd_get_output_embd(self._ptr)
                return np.ctypeslib.as_array(ptr, shape=(n_tok * self.model.n_embd,)).reshape(n_tok, -1).copy()
            raise NativeError("mtmd produced no image chunk", self.path)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)
