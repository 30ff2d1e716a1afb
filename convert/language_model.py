"""Write the LLaMA-architecture language model (Vicuna, SmolLM2, ...) of a Checkpoint as a llama.cpp GGUF (arch `llama`).

Streams tensor by tensor (see gguf_stream); tensor names come from tensor_names, shapes and order from
shapes.lm_shapes, so the tensor headers are written before any weight is read. Q/K rows are permuted
from HF's rotate-half RoPE layout into the interleaved-pairs layout ggml's rope kernel uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from factedge.convert.gguf_stream import PlannedTensor, Progress, add_provenance, all_finite, to_numpy, write_gguf
from factedge.convert.shapes import lm_shapes
from factedge.convert.specs import Checkpoint, LazyTensors, TextSpec
from factedge.convert.tensor_names import LM_TENSORS, gguf_name, is_rope_permuted
from factedge.convert.chat_template import gguf_chat_template
from factedge.convert.vocab import Vocab
from factedge.convert.vocab_read import read_vocab
from factedge.edge.errors import MismatchError, NumericsError
from factedge.edge.file_types import lm_base_type

def ftype_types(ftype: str):
    """(GGML tensor type for 2-D weights, GGUF general.file_type) of an ftype name."""
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    table = {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16)}
    return table[lm_base_type(ftype)]


def permute_qk(weight, n_head: int):
    """HF q/k rows (per head: first halves, then second halves) -> llama.cpp's interleaved pairs."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_qk(weight, n_head: int):
    """Inverse of permute_qk (llama.cpp layout back to HF)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def qk_heads(gguf_tensor: str, text: TextSpec) -> int | None:
    """Heads to permute a q/k tensor by (kv heads for k), None for tensors that are not permuted."""
    if not is_rope_permuted(gguf_tensor):
        return None
    return text.num_kv_heads if ".attn_k." in gguf_tensor else text.num_heads


def _producer(load, name: str, shape: tuple[int, ...], heads: int | None, qtype, check_finite: bool):
    def produce():
        tensor = load()
        if tuple(tensor.shape) != shape:
            raise MismatchError(f"tensor {name}: shape {list(tensor.shape)}, the config implies {list(shape)}")
        if heads is not None:
            tensor = permute_qk(tensor, heads)
        array = to_numpy(tensor, qtype)
        if check_finite and not all_finite(array):
            raise NumericsError(f"tensor {name} is not finite after conversion (f16 overflow?)")
        return array

    return produce


def plan_lm(text: TextSpec, tensors: LazyTensors, ftype: str) -> list[PlannedTensor]:
    """Output tensors in canonical order; every expected tensor must be among `tensors`."""
    from gguf import GGMLQuantizationType as Q

    qtype, _ = ftype_types(ftype)
    loaders = dict(tensors)  # name -> loader (closures only; nothing is loaded here)
    plan = []
    for name, shape in lm_shapes(text).items():
        if name == "lm_head.weight" and text.tie_word_embeddings:
            continue  # llama.cpp reads token_embd as the output matrix when `output` is absent
        if name not in loaders:
            raise MismatchError(f"language-model tensor {name} missing from the tensors to write")
        out_name = gguf_name(name, LM_TENSORS)
        assert out_name is not None, name
        t_type = Q.F32 if len(shape) == 1 else qtype  # norms stay F32, as llama.cpp expects
        produce = _producer(loaders[name], name, shape, qk_heads(out_name, text), t_type, t_type == Q.F16)
        plan.append(PlannedTensor(out_name, shape, t_type, produce))
    return plan


def add_vocab(writer, vocab: Vocab, text: TextSpec) -> None:
    """The tokenizer keys llama.cpp reads: model, pre-tokenizer, tokens, scores or merges, types, ids."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(text.bos_token_id)
    writer.add_eos_token_id(text.eos_token_id)
    writer.add_unk_token_id(text.unk_token_id)
    writer.add_pad_token_id(text.pad_token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)


def _metadata(ckpt: Checkpoint, ftype: str, name: str, extra_kv: dict[str, Any]):
    from gguf import GGML_QUANT_VERSION, GGUFType

    text = ckpt.text
    _, file_type = ftype_types(ftype)
    vocab = read_vocab(ckpt.tokenizer_dir, text.vocab_size)
    template = gguf_chat_template(Path(ckpt.tokenizer_dir))

    def add(writer) -> None:
        writer.add_type(GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(file_type)
        writer.add_quantization_version(GGML_QUANT_VERSION)
        writer.add_vocab_size(text.vocab_size)
        writer.add_context_length(text.max_position_embeddings)
        writer.add_embedding_length(text.hidden_size)
        writer.add_block_count(text.num_layers)
        writer.add_feed_forward_length(text.intermediate_size)
        writer.add_head_count(text.num_heads)
        writer.add_head_count_kv(text.num_kv_heads)
        writer.add_rope_dimension_count(text.hidden_size // text.num_heads)
        writer.add_rope_freq_base(text.rope_theta)
        writer.add_layer_norm_rms_eps(text.rms_norm_eps)
        add_vocab(writer, vocab, text)
        writer.add_chat_template(template)  # the format edge.chat_format renders prompts with
        add_provenance(writer, ckpt.layout, "language_model", extra_kv)

    return add


def write_language_model(
    ckpt: Checkpoint,
    out_path: str | Path,
    *,
    tensors: LazyTensors | None = None,
    ftype: str = "f16",
    progress: Progress | None = None,
    extra_kv: dict[str, Any] | None = None,
    name: str | None = None,
) -> Path:
    """Write `tensors` (default: the checkpoint's own LM; e.g. LoRA-merged ones) as a llama GGUF."""
    plan = plan_lm(ckpt.text, tensors if tensors is not None else ckpt.lm_tensors(), ftype)
    metadata = _metadata(ckpt, ftype, name or ckpt.root.name, extra_kv or {})
    return write_gguf(out_path, "llama", metadata, plan, progress=progress)
