"""Random but well-conditioned weights for the tiny LLaVA-family test checkpoints.

Parity tests compare llama.cpp against PyTorch by greedy tokens and logits, so the tiny models must
not be degenerate: logits need a clear top-1 margin, greedy runs must not loop on one token, images
must move the answer, and every bias / norm weight is non-trivial so a tensor dropped or misnamed by a
converter changes the numbers. Each tensor is drawn from its own generator seeded by (seed, name):
the same component gets the same values whatever layout it is written in, so converters fed two
layouts of one seed must produce identical GGUF tensors.

Names are canonical (see `factedge.convert.specs`): HF LlamaForCausalLM names for the language model,
HF CLIPModel names (`vision_model.*`, `text_model.*`, ...) for CLIP, LLaVA `nn.Sequential` indices for
the projector; layout writers rename.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from factedge.convert.specs import ProjectorType, TextSpec, VisionSpec

# Init gains, tuned for margins and greedy diversity (figures: tests/train/test_tiny.py docstring).
LM_HEAD_GAIN = 8.0  # logits std ~ this: clear top-1 margins over 32000 entries
QK_GAIN = 2.0  # sharper attention than 1/sqrt(d) init, so context matters
EMBED_STD = 1.0
NORM_JITTER = 0.1  # norm weights 1 + N(0, 0.1)
BIAS_STD = 0.05
LORA_B_STD = 0.1  # merged delta ~ 25% of the base weight's scale: visible, sane
# A tied head reads the embedding back, so a token's own logit dominates and greedy repeats it unless
# the layers write more into the residual stream than the embedding put there (16 distinct greedy
# tokens out of 16 at 4x on the tiny SmolLM2 build, one repeated token at 1x).
TIED_RESIDUAL_GAIN = 4.0


def tiny_text(vocab_size: int = 32000) -> TextSpec:
    """The shared tiny LLaMA (shapes from COMMON.md); llava-hf pads vocab_size to 32064."""
    return TextSpec(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
    )


def tiny_vision(image_size: int = 224) -> VisionSpec:
    """The shared tiny CLIP ViT (224 -> 256 patches, 336 -> 576)."""
    return VisionSpec(
        image_size=image_size,
        patch_size=14,
        hidden_size=64,
        intermediate_size=128,
        num_layers=3,
        num_heads=4,
    )


@dataclass(frozen=True)
class ClipTextShape:
    """CLIP's text tower (only shipped so the CLIP folder is a whole CLIPModel; LLaVA never runs it)."""

    vocab_size: int = 49408
    hidden_size: int = 32
    intermediate_size: int = 64
    num_layers: int = 1
    num_heads: int = 2
    max_position_embeddings: int = 77
    projection_dim: int = 32


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def normal(seed: int, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
    """float32 N(mean, std) tensor that depends only on (seed, name, shape)."""
    t = torch.randn(shape, generator=_generator(seed, name), dtype=torch.float32)
    return t.mul_(std).add_(mean)


def _linear(out: dict, seed: int, name: str, n_out: int, n_in: int, gain: float = 1.0, bias: bool = False):
    out[f"{name}.weight"] = normal(seed, f"{name}.weight", (n_out, n_in), gain / math.sqrt(n_in))
    if bias:
        out[f"{name}.bias"] = normal(seed, f"{name}.bias", (n_out,), BIAS_STD)


def _norm(out: dict, seed: int, name: str, dim: int, bias: bool):
    out[f"{name}.weight"] = normal(seed, f"{name}.weight", (dim,), NORM_JITTER, mean=1.0)
    if bias:
        out[f"{name}.bias"] = normal(seed, f"{name}.bias", (dim,), BIAS_STD)


def text_weights(spec: TextSpec, seed: int, base_vocab: int = 32000,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM state dict. Rows past `base_vocab` (llava-hf's padding) are drawn the way
    llava-hf's converter fills them: the mean of the real rows plus a little noise.

    dtype: each tensor is drawn in float32 and cast at once (same values as casting the whole dict
    later), so building a GB-sized model needs about its final size of RAM, not twice that."""
    h, f = spec.hidden_size, spec.intermediate_size
    residual = TIED_RESIDUAL_GAIN if spec.tie_word_embeddings else 1.0
    head_dim = h // spec.num_heads
    kv = spec.num_kv_heads * head_dim

    def vocab_matrix(key: str, std: float) -> torch.Tensor:
        real = normal(seed, key, (base_vocab, h), std)
        if spec.vocab_size > base_vocab:
            pad = real.mean(0, keepdim=True) + normal(seed, f"{key}.pad", (spec.vocab_size - base_vocab, h), 1e-3)
            real = torch.cat([real, pad])
        return real.to(dtype)

    def cast(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(dtype) for k, v in part.items()}

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": vocab_matrix("model.embed_tokens.weight", EMBED_STD)}
    for i in range(spec.num_layers):
        p, layer = f"model.layers.{i}", {}
        _norm(layer, seed, f"{p}.input_layernorm", h, bias=False)
        _linear(layer, seed, f"{p}.self_attn.q_proj", h, h, gain=QK_GAIN)
        _linear(layer, seed, f"{p}.self_attn.k_proj", kv, h, gain=QK_GAIN)
        _linear(layer, seed, f"{p}.self_attn.v_proj", kv, h)
        _linear(layer, seed, f"{p}.self_attn.o_proj", h, h, gain=residual)
        _norm(layer, seed, f"{p}.post_attention_layernorm", h, bias=False)
        _linear(layer, seed, f"{p}.mlp.gate_proj", f, h)
        _linear(layer, seed, f"{p}.mlp.up_proj", f, h)
        _linear(layer, seed, f"{p}.mlp.down_proj", h, f, gain=residual)
        sd.update(cast(layer))
    final: dict[str, torch.Tensor] = {}
    _norm(final, seed, "model.norm", h, bias=False)
    sd.update(cast(final))
    sd["lm_head.weight"] = vocab_matrix("lm_head.weight", LM_HEAD_GAIN / math.sqrt(h))
    return sd


def vision_weights(spec: VisionSpec, seed: int) -> dict[str, torch.Tensor]:
    """CLIPVisionModel state dict (names start with `vision_model.`)."""
    d, f, p = spec.hidden_size, spec.intermediate_size, spec.patch_size
    n_pos = spec.tokens_per_image + 1
    sd: dict[str, torch.Tensor] = {}
    e = "vision_model.embeddings"
    sd[f"{e}.class_embedding"] = normal(seed, f"{e}.class_embedding", (d,), 1.0)
    sd[f"{e}.patch_embedding.weight"] = normal(seed, f"{e}.patch_embedding.weight", (d, 3, p, p), 1 / math.sqrt(3 * p * p))
    sd[f"{e}.position_embedding.weight"] = normal(seed, f"{e}.position_embedding.weight", (n_pos, d), 0.5)
    _norm(sd, seed, "vision_model.pre_layrnorm", d, bias=True)
    for i in range(spec.num_layers):
        q = f"vision_model.encoder.layers.{i}"
        _norm(sd, seed, f"{q}.layer_norm1", d, bias=True)
        _linear(sd, seed, f"{q}.self_attn.k_proj", d, d, gain=QK_GAIN, bias=True)
        _linear(sd, seed, f"{q}.self_attn.v_proj", d, d, bias=True)
        _linear(sd, seed, f"{q}.self_attn.q_proj", d, d, gain=QK_GAIN, bias=True)
        _linear(sd, seed, f"{q}.self_attn.out_proj", d, d, bias=True)
        _norm(sd, seed, f"{q}.layer_norm2", d, bias=True)
        _linear(sd, seed, f"{q}.mlp.fc1", f, d, bias=True)
        _linear(sd, seed, f"{q}.mlp.fc2", d, f, bias=True)
    _norm(sd, seed, "vision_model.post_layernorm", d, bias=True)
    return sd


def projector_weights(kind: ProjectorType, vision: VisionSpec, text: TextSpec, seed: int) -> dict[str, torch.Tensor]:
    """LLaVA mm_projector (`0.*` Linear, and for mlp2x_gelu `2.*` after the GELU)."""
    sd: dict[str, torch.Tensor] = {}
    _linear(sd, seed, f"mm_projector.{kind}.0", text.hidden_size, vision.hidden_size, bias=True)
    if kind == "mlp2x_gelu":
        _linear(sd, seed, f"mm_projector.{kind}.2", text.hidden_size, text.hidden_size, gain=1.5, bias=True)
    elif kind != "linear":
        raise ValueError(f"unknown projector type {kind!r}")
    prefix = f"mm_projector.{kind}."
    return {k[len(prefix):]: v for k, v in sd.items()}


def clip_text_weights(shape: ClipTextShape, seed: int) -> dict[str, torch.Tensor]:
    """CLIPTextModel state dict (names start with `text_model.`)."""
    d, f = shape.hidden_size, shape.intermediate_size
    sd: dict[str, torch.Tensor] = {}
    e = "text_model.embeddings"
    sd[f"{e}.token_embedding.weight"] = normal(seed, f"{e}.token_embedding.weight", (shape.vocab_size, d), 0.02)
    sd[f"{e}.position_embedding.weight"] = normal(seed, f"{e}.position_embedding.weight", (shape.max_position_embeddings, d), 0.01)
    for i in range(shape.num_layers):
        q = f"text_model.encoder.layers.{i}"
        _norm(sd, seed, f"{q}.layer_norm1", d, bias=True)
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            _linear(sd, seed, f"{q}.self_attn.{proj}", d, d, bias=True)
        _norm(sd, seed, f"{q}.layer_norm2", d, bias=True)
        _linear(sd, seed, f"{q}.mlp.fc1", f, d, bias=True)
        _linear(sd, seed, f"{q}.mlp.fc2", d, f, bias=True)
    _norm(sd, seed, "text_model.final_layer_norm", d, bias=True)
    return sd


def clip_model_weights(vision: VisionSpec, text: ClipTextShape, seed: int) -> dict[str, torch.Tensor]:
    """A whole CLIPModel state dict in the order openai's pytorch_model.bin lists it, including the
    `position_ids` buffers that 2021-era checkpoints carry (converters must skip them)."""
    sd = clip_text_weights(text, seed)
    sd["text_model.embeddings.position_ids"] = torch.arange(text.max_position_embeddings).unsqueeze(0)
    sd.update(vision_weights(vision, seed))
    sd["vision_model.embeddings.position_ids"] = torch.arange(vision.tokens_per_image + 1).unsqueeze(0)
    _linear(sd, seed, "visual_projection", text.projection_dim, vision.hidden_size)
    _linear(sd, seed, "text_projection", text.projection_dim, text.hidden_size)
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=torch.float32)
    return sd


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_weights(text: TextSpec, seed: int, r: int = 64) -> dict[str, torch.Tensor]:
    """LoRA A/B pairs for every LLaMA projection, named relative to LlamaForCausalLM
    (`model.layers.{i}.self_attn.q_proj.lora_A.weight`). B is non-zero (a trained adapter)."""
    shapes = {}
    h, f = text.hidden_size, text.intermediate_size
    kv = text.num_kv_heads * (h // text.num_heads)
    dims = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    for i in range(text.num_layers):
        for target in LORA_TARGETS:
            block = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            shapes[f"model.layers.{i}.{block}.{target}"] = dims[target]
    sd: dict[str, torch.Tensor] = {}
    for name, (n_out, n_in) in shapes.items():
        sd[f"{name}.lora_A.weight"] = normal(seed, f"{name}.lora_A", (r, n_in), 1 / math.sqrt(n_in))
        sd[f"{name}.lora_B.weight"] = normal(seed, f"{name}.lora_B", (n_out, r), LORA_B_STD)
    return sd
