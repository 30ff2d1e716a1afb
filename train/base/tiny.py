"""Build tiny LLaVA-family checkpoints laid out exactly like the real ones, for tests and the demo.

Real checkpoints are gigabytes and not reachable offline; converters must still be tested against
the real file names, key names, configs, dtypes and sharding. `build_tiny` writes the same files
with shrunk shapes (`tiny_weights.tiny_text` / `tiny_vision`), random well-conditioned weights and
the real 32000-piece LLaMA tokenizer. Output is byte-identical for a given seed and folder.

Layouts:
- "llava-hf": a llava-hf hub folder (LlavaForConditionalGeneration, safetensors, hub key names).
- "llava": original LLaVA-v1.5 `LlavaLlamaForCausalLM` folder plus a separate openai CLIP folder
  named by absolute path in `mm_vision_tower`. Returns the LLaVA folder; CLIP sits beside it.
- "llava-rlhf": `LLaVA-RLHF-tiny-<px>/` with `sft_model/` (original LLaVA format, bf16, linear
  projector), `rlhf_lora_adapter_model/` (PEFT LoRA) and the CLIP folder. Returns that root.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from factedge.convert.specs import LayoutName, ProjectorType, TextSpec, VisionSpec
from factedge.edge.errors import ConfigError
from factedge.train.base import tiny_weights as tw
from factedge.train.base.spm_vocab import default_vocab_path, tokenizer_model_bytes
from factedge.edge.atomic import write_bytes
from factedge.train.base.tensor_files import WeightFormat, save_checkpoint, save_tensors, write_hf_json

LLAVA_HF_VOCAB = 32064  # llava-hf pads 32000 + <image> + <pad> up to a multiple of 64
IMAGE_TOKEN_ID = 32000
PAD_TOKEN_ID_HF = 32001
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_BOS = {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def clip_folder_name(image_size: int) -> str:
    """openai's repo names (LLaVA configs name these hub ids)."""
    return {224: "clip-vit-large-patch14", 336: "clip-vit-large-patch14-336"}.get(
        image_size, f"clip-vit-large-patch14-{image_size}"
    )


def _special(content: str) -> dict:
    return {**_BOS, "content": content}


# ---------------------------------------------------------------- tokenizer files
def write_tokenizer(folder: Path, model_bytes: bytes, hf: bool) -> None:
    """tokenizer.model + configs: llava-hf adds `<image>`/`<pad>`, original LLaVA keeps 32000."""
    write_bytes(folder / "tokenizer.model", model_bytes)
    decoder = {str(i): {**_special(t), "special": True} for i, t in enumerate(("<unk>", "<s>", "</s>"))}
    cfg = {"add_bos_token": True, "add_eos_token": False}
    if hf:
        decoder[str(IMAGE_TOKEN_ID)] = {**_special("<image>"), "special": True}
        decoder[str(PAD_TOKEN_ID_HF)] = {**_special("<pad>"), "special": True}
        cfg.update(added_tokens_decoder=decoder, bos_token="<s>", clean_up_tokenization_spaces=False,
                   eos_token="</s>", legacy=False, model_max_length=1000000000000000019884624838656,
                   pad_token="<pad>", padding_side="left", processor_class="LlavaProcessor",
                   sp_model_kwargs={}, tokenizer_class="LlamaTokenizer", trust_remote_code=False,
                   unk_token="<unk>", use_default_system_prompt=False)
        write_hf_json(folder / "added_tokens.json", {"<image>": IMAGE_TOKEN_ID, "<pad>": PAD_TOKEN_ID_HF})
        specials = {"bos_token": _special("<s>"), "eos_token": _special("</s>"),
                    "pad_token": _special("<pad>"), "unk_token": _special("<unk>")}
    else:
        cfg.update(added_tokens_decoder=decoder, bos_token="<s>", clean_up_tokenization_spaces=False,
                   eos_token="</s>", legacy=False, model_max_length=2048, pad_token=None,
                   padding_side="right", sp_model_kwargs={}, tokenizer_class="LlamaTokenizer",
                   unk_token="<unk>")
        specials = {"bos_token": _special("<s>"), "eos_token": _special("</s>"),
                    "pad_token": "<unk>", "unk_token": _special("<unk>")}
    write_hf_json(folder / "tokenizer_config.json", cfg)
    write_hf_json(folder / "special_tokens_map.json", specials)


# ---------------------------------------------------------------- configs
def _llama_config(text: TextSpec, dtype: torch.dtype) -> dict:
    return {
        "hidden_act": "silu",
        "hidden_size": text.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings,
        "model_type": "llama",
        "num_attention_heads": text.num_heads,
        "num_hidden_layers": text.num_layers,
        "num_key_value_heads": text.num_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": text.rope_theta,
        "tie_word_embeddings": text.tie_word_embeddings,
        "torch_dtype": _DTYPE_NAMES[dtype],
        "vocab_size": text.vocab_size,
    }


def _clip_vision_config(vision: VisionSpec, projection_dim: int) -> dict:
    return {
        "hidden_act": vision.hidden_act,
        "hidden_size": vision.hidden_size,
        "image_size": vision.image_size,
        "intermediate_size": vision.intermediate_size,
        "layer_norm_eps": vision.layer_norm_eps,
        "model_type": "clip_vision_model",
        "num_attention_heads": vision.num_heads,
        "num_channels": 3,
        "num_hidden_layers": vision.num_layers,
        "patch_size": vision.patch_size,
        "projection_dim": projection_dim,
    }


def llava_hf_config(text: TextSpec, vision: VisionSpec, image_token_id: int = IMAGE_TOKEN_ID,
                    pad_token_id: int = PAD_TOKEN_ID_HF, lm_name: str = "lmsys/vicuna-7b-v1.5") -> dict:
    """config.json of a llava-hf hub folder (as the 4.36-era conversion script wrote it)."""
    text_cfg = {"_name_or_path": lm_name, "architectures": ["LlamaForCausalLM"],
                **_llama_config(text, torch.float16)}
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_seq_length": vision.tokens_per_image,
        "image_token_index": image_token_id,
        "model_type": "llava",
        "pad_token_id": pad_token_id,
        "projector_hidden_act": "gelu",
        "text_config": text_cfg,
        "tie_word_embeddings": text.tie_word_embeddings,
        "torch_dtype": "float16",
        "transformers_version": "4.36.0.dev0",
        "vision_config": _clip_vision_config(vision, tw.ClipTextShape().projection_dim),
        "vision_feature_layer": vision.feature_layer,
        "vision_feature_select_strategy": "default",
        "vocab_size": text.vocab_size,
    }


def llava_config(text: TextSpec, vision: VisionSpec, projector: ProjectorType, clip_dir: Path,
                  dtype: torch.dtype) -> dict:
    """config.json as LLaVA-v1.5 training writes it (`mm_projector_type` only for the MLP)."""
    cfg = {
        "_name_or_path": "./checkpoints/vicuna-7b-v1-5",
        "architectures": ["LlavaLlamaForCausalLM"],
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "max_length": text.max_position_embeddings,
        "mm_hidden_size": vision.hidden_size,
        "mm_projector_type": projector,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": vision.select_feature,
        "mm_vision_select_layer": vision.feature_layer,
        "mm_vision_tower": str(clip_dir.resolve()),
        "pad_token_id": text.pad_token_id,
        "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": False,
        "use_cache": True,
        "use_mm_proj": True,
        **_llama_config(text, dtype),
    }
    cfg["model_type"] = "llava"
    cfg["transformers_version"] = "4.31.0"
    if projector == "linear":
        del cfg["mm_projector_type"]
    return cfg


def generation_config(pad_token_id: int, version: str) -> dict:
    return {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": pad_token_id, "transformers_version": version}


# ---------------------------------------------------------------- layouts
def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def write_clip(folder: Path, vision: VisionSpec, seed: int) -> Path:
    """A whole openai CLIPModel folder (fp32 pytorch_model.bin, 2021-style preprocessor config)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = tw.ClipTextShape()
    save_tensors(folder / "pytorch_model.bin", tw.clip_model_weights(vision, text, seed), "bin")
    text_cfg = {
        "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size, "layer_norm_eps": 1e-5,
        "max_position_embeddings": text.max_position_embeddings, "model_type": "clip_text_model",
        "num_attention_heads": text.num_heads, "num_hidden_layers": text.num_layers, "pad_token_id": 1,
        "projection_dim": text.projection_dim, "vocab_size": text.vocab_size,
    }
    write_hf_json(folder / "config.json", {
        "_name_or_path": f"openai/{clip_folder_name(vision.image_size)}",
        "architectures": ["CLIPModel"],
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "clip",
        "projection_dim": text.projection_dim,
        "text_config": text_cfg,
        "torch_dtype": "float32",
        "transformers_version": None,
        "vision_config": _clip_vision_config(vision, text.projection_dim),
    })
    write_hf_json(folder / "preprocessor_config.json", {
        "crop_size": vision.image_size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(vision.image_mean),
        "image_std": list(vision.image_std),
        "resample": 3,
        "size": vision.image_size,
    })
    return folder


def llava_hf_state_dict(text: TextSpec, vision: VisionSpec, seed: int,
                        lm: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tiny CLIP tower, an mlp2x_gelu projector and the LM state dict `lm` under 4.36-era llava-hf keys."""
    sd = {f"vision_tower.{k}": v for k, v in tw.vision_weights(vision, seed).items()}
    proj = tw.projector_weights("mlp2x_gelu", vision, text, seed)
    hf_names = {"0": "linear_1", "2": "linear_2"}  # nn.Sequential index -> LlavaMultiModalProjector
    sd.update({f"multi_modal_projector.{hf_names[k[0]]}.{k[2:]}": v for k, v in proj.items()})
    sd.update({f"language_model.{k}": v for k, v in lm.items()})
    return sd


def write_preprocessor(out: Path, vision: VisionSpec) -> None:
    """preprocessor_config.json of a llava-hf folder (CLIPImageProcessor: the image contract)."""
    size = vision.image_size
    write_hf_json(out / "preprocessor_config.json", {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(vision.image_mean),
        "image_processor_type": "CLIPImageProcessor",
        "image_std": list(vision.image_std),
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": size},
    })


def _write_llava_hf(out: Path, text: TextSpec, vision: VisionSpec, sharded: bool, seed: int, tok: bytes) -> Path:
    sd = llava_hf_state_dict(text, vision, seed, tw.text_weights(text, seed, dtype=torch.float16))
    save_checkpoint(out, _cast(sd, torch.float16), "safetensors", n_shards=2 if sharded else 1)
    write_hf_json(out / "config.json", llava_hf_config(text, vision))
    write_hf_json(out / "generation_config.json", generation_config(PAD_TOKEN_ID_HF, "4.36.0.dev0"))
    write_tokenizer(out, tok, hf=True)
    write_preprocessor(out, vision)
    write_hf_json(out / "processor_config.json", {
        "image_token": "<image>",
        "num_additional_image_tokens": 1,
        "patch_size": vision.patch_size,
        "processor_class": "LlavaProcessor",
        "vision_feature_select_strategy": "default",
    })
    return out


def write_llava_model(folder: Path, text: TextSpec, vision: VisionSpec, projector: ProjectorType, clip_dir: Path,
                      dtype: torch.dtype, sharded: bool, seed: int, tokenizer: Callable[[Path], None]) -> Path:
    """An original-LLaVA `LlavaLlamaForCausalLM` folder (state-dict order: LM, norm, projector, head;
    no head when the embeddings are tied, as HF's save drops it); `tokenizer(folder)` writes its files."""
    folder.mkdir(parents=True, exist_ok=True)
    lm = tw.text_weights(text, seed, base_vocab=text.vocab_size, dtype=dtype)
    head = lm.pop("lm_head.weight")
    sd = dict(lm)
    proj = tw.projector_weights(projector, vision, text, seed)
    if projector == "linear":  # a bare nn.Linear in LLaVA, not an nn.Sequential: no index
        proj = {k.removeprefix("0."): v for k, v in proj.items()}
    sd.update({f"model.mm_projector.{k}": v for k, v in proj.items()})
    if not text.tie_word_embeddings:
        sd["lm_head.weight"] = head
    save_checkpoint(folder, _cast(sd, dtype), "bin", n_shards=2 if sharded else 1)
    write_hf_json(folder / "config.json", llava_config(text, vision, projector, clip_dir, dtype))
    write_hf_json(folder / "generation_config.json", generation_config(text.pad_token_id, "4.31.0"))
    tokenizer(folder)
    return folder


def write_lora_adapter(folder: Path, base_dir: Path, seed: int, fmt: WeightFormat = "bin",
                       text: TextSpec | None = None) -> Path:
    """PEFT LoRA folder for a LlavaLlamaForCausalLM (r=64, alpha=16, all seven LLaMA projections;
    LLaVA-RLHF's 4-bit training leaves mm_projector and lm_head unquantized, so not targeted).
    text: the base LLaMA's shape (default: the shared tiny one)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = text or tw.tiny_text()
    # bf16 like LLaVA-RLHF's QLoRA training (LoraLayer modules cast to bf16 before saving)
    sd = _cast({f"base_model.model.{k}": v for k, v in tw.lora_weights(text, seed).items()}, torch.bfloat16)
    name = "adapter_model.safetensors" if fmt == "safetensors" else "adapter_model.bin"
    save_tensors(folder / name, sd, fmt)
    write_hf_json(folder / "adapter_config.json", {
        "auto_mapping": None,
        "base_model_name_or_path": str(base_dir.resolve()),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": 64,
        "revision": None,
        "target_modules": list(tw.LORA_TARGETS),
        "task_type": "CAUSAL_LM",
    })
    return folder


def build_tiny(
    layout: LayoutName,
    out_dir: str | Path,
    *,
    image_size: int = 224,
    projector: ProjectorType | None = None,
    sharded: bool | None = None,
    seed: int = 0,
    adapter_format: WeightFormat = "bin",
    vocab_gguf: str | Path | None = None,
    text: TextSpec | None = None,
    vision: VisionSpec | None = None,
) -> Path:
    """Write a tiny checkpoint of `layout` under `out_dir` and return its root (see module doc).

    projector: llava-hf is always mlp2x_gelu; "llava" defaults to mlp2x_gelu (v1.5), "llava-rlhf"
    to linear. sharded: None = the layout's usual form (llava-hf one file, original LLaVA two .bin
    shards). vocab_gguf: the LLaMA SPM vocab GGUF (default: `spm_vocab.default_vocab_path()`).
    text / vision: other shapes than the shared tiny ones (benchmarks build GB-sized models this
    way); `vision` replaces `image_size`, and llava-hf pads text's vocab to 32064 as always.
    """
    if layout not in ("llava-hf", "llava", "llava-rlhf"):
        raise ConfigError(f"unknown layout {layout!r} (llava-hf, llava, llava-rlhf)")
    if projector not in (None, "linear", "mlp2x_gelu") or (layout == "llava-hf" and projector == "linear"):
        raise ConfigError(f"projector {projector!r} not available for {layout} (llava-hf: mlp2x_gelu only)")
    vision = vision or tw.tiny_vision(image_size)
    image_size = vision.image_size
    if image_size % vision.patch_size or image_size <= 0:
        raise ConfigError(f"image_size {image_size} is not a positive multiple of the patch size {vision.patch_size}")
    if adapter_format not in ("bin", "safetensors"):
        raise ConfigError(f"adapter_format {adapter_format!r} is neither bin nor safetensors")
    out = Path(out_dir)
    tok = tokenizer_model_bytes(vocab_gguf or default_vocab_path())
    out.mkdir(parents=True, exist_ok=True)
    text = text or tw.tiny_text()
    if layout == "llava-hf":
        return _write_llava_hf(out, replace(text, vocab_size=LLAVA_HF_VOCAB), vision, bool(sharded), seed, tok)
    if layout == "llava":
        clip_dir = out / clip_folder_name(image_size)
        write_clip(clip_dir, vision, seed)
        model = out / f"llava-v1.5-tiny-{image_size}"
        return write_llava_model(model, text, vision, projector or "mlp2x_gelu", clip_dir, torch.float16,
                                 sharded is not False, seed, lambda folder: write_tokenizer(folder, tok, hf=False))
    root = out / f"LLaVA-RLHF-tiny-{image_size}"
    clip_dir = root / clip_folder_name(image_size)
    write_clip(clip_dir, vision, seed)
    sft = write_llava_model(root / "sft_model", text, vision, projector or "linear", clip_dir,
                            torch.bfloat16, sharded is not False, seed, lambda folder: write_tokenizer(folder, tok, hf=False))
    write_lora_adapter(root / "rlhf_lora_adapter_model", sft, seed, adapter_format, text=text)
    return root

