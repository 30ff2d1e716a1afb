"""The PyTorch reference a converted GGUF is judged against, built from a `Checkpoint`.

It is assembled from stock parts so that "the reference" means "what HF/LLaVA compute", not our own
maths: `transformers.CLIPVisionModel` (features = `hidden_states[feature_layer]`, CLS dropped for
"patch"), LLaVA's projector (`nn.Linear` or Linear-GELU-Linear, same `nn.Sequential` indices as the
canonical names), `transformers.LlamaForCausalLM`, and for LLaVA-RLHF the LoRA adapter through
`peft` -- unmerged ("peft", how its authors run it) or merged ("merged", what the GGUF contains).
Pixels come from `factedge.edge.image`, so llama.cpp and this reference see identical input.
Weights load strictly: every tensor of the checkpoint is consumed and every parameter is filled,
shapes asserted, or a MismatchError says which one.
"""

from __future__ import annotations

import contextlib
import inspect
import pickle
from pathlib import Path
from typing import Iterator, Literal, Sequence, Union

import numpy as np
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from factedge.convert.projectors import projector
from factedge.convert.specs import Checkpoint, LazyTensors, TextSpec, VisionSpec
from factedge.edge.errors import ConfigError, CorruptFileError, InputError, MismatchError, NumericsError
from factedge.edge.errors import UnsafePickleError
from factedge.edge.image import ImageSource, normalize, prepare_image

try:  # transformers >= 5
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4.x
    from transformers.modeling_utils import no_init_weights

AdapterMode = Literal["peft", "merged"]
# A prompt is a list of segments: token ids (list/tuple of int), an image (anything
# `edge.image.load_image` accepts), or precomputed image embeddings (float ndarray [tokens, n_embd]).
Segment = Union[Sequence[int], ImageSource]

CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def vision_config(spec: VisionSpec) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        num_channels=3,
        hidden_act=spec.hidden_act,
        layer_norm_eps=spec.layer_norm_eps,
        attn_implementation="eager",  # the literal softmax(QK^T)V, no fused kernel
    )


def text_config(spec: TextSpec) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        rms_norm_eps=spec.rms_norm_eps,
        rope_theta=spec.rope_theta,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_id,
        pad_token_id=spec.pad_token_id,
        attn_implementation="eager",
    )


def build_projector(kind: str, vision_hidden: int, text_hidden: int) -> nn.Sequential:
    """LLaVA's `mm_projector` from its row in convert.projectors (the canonical Sequential indices)."""
    return projector(kind).build_torch(vision_hidden, text_hidden)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_strict(module: nn.Module, tensors: LazyTensors, *, prefix: str, what: str, path: Path | None) -> None:
    """Copy `tensors` into `module`'s parameters; every tensor used, every parameter filled, shapes equal.

    Tied parameters (one tensor under two names) are satisfied by either name.
    """
    params = dict(module.named_parameters(remove_duplicate=False))
    aliases: dict[int, set[str]] = {}
    for name, param in params.items():
        aliases.setdefault(id(param), set()).add(name)
    filled: set[int] = set()
    for canonical, loader in tensors:
        name = prefix + canonical
        if name not in params:
            raise MismatchError(f"{what} tensor {canonical!r} has no place in the reference model", path)
        param = params[name]
        value = loader()
        if tuple(value.shape) != tuple(param.shape):
            raise MismatchError(
                f"{what} tensor {canonical!r} has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}",
                path,
            )
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
        filled.add(id(param))
    missing = sorted(min(names) for key, names in aliases.items() if key not in filled)
    if missing:
        shown = ", ".join(n[len(prefix):] for n in missing[:5])
        raise MismatchError(f"{what} tensors missing from the checkpoint: {shown} ({len(missing)} in all)", path)


def build_loaded(ckpt: Checkpoint, dtype: torch.dtype, text_cfg: LlamaConfig | None = None
                 ) -> tuple[CLIPVisionModel, nn.Sequential, LlamaForCausalLM]:
    """The checkpoint's vision tower, projector and LLaMA, built without random init in `dtype` and
    loaded strictly (shapes checked); `text_cfg` overrides `text_config(ckpt.text)` (e.g. attention)."""
    vspec, tspec = ckpt.vision, ckpt.text
    if vspec.select_feature not in ("patch", "cls_patch"):
        raise ConfigError(f"unknown vision select_feature {vspec.select_feature!r}")
    with _default_dtype(dtype), no_init_weights():
        vision = CLIPVisionModel(vision_config(vspec))
        projector = build_projector(ckpt.projector_type, vspec.hidden_size, tspec.hidden_size)
        lm = LlamaForCausalLM(text_cfg if text_cfg is not None else text_config(tspec))
    # transformers 4 nests the tower under `vision_model.`; 5 flattens it (canonical names as-is)
    vprefix = "vision_model." if hasattr(vision, "vision_model") else ""
    load_strict(vision, ckpt.vision_tensors(), prefix=vprefix, what="vision", path=ckpt.root)
    load_strict(projector, ckpt.projector_tensors(), prefix="", what="projector", path=ckpt.root)
    load_strict(lm, ckpt.lm_tensors(), prefix="", what="language model", path=ckpt.root)
    if tspec.tie_word_embeddings:
        lm.tie_weights()
    return vision, projector, lm


def _adapter_state_dict(adapter_dir: Path) -> dict[str, torch.Tensor]:
    st, pt = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except (SafetensorError, OSError) as exc:
            raise CorruptFileError(f"cannot read the LoRA adapter: {exc}", st) from exc
    if pt.is_file():
        try:
            return torch.load(pt, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafePickleError(f"adapter pickle needs more than tensors: {exc}", pt) from exc
        except (RuntimeError, EOFError, OSError) as exc:
            raise CorruptFileError(f"cannot read the LoRA adapter: {exc}", pt) from exc
    raise InputError("no adapter_model.safetensors or adapter_model.bin", adapter_dir)


def apply_adapter(lm: LlamaForCausalLM, adapter_dir: Path, mode: AdapterMode) -> nn.Module:
    """Wrap `lm` with the PEFT LoRA in `adapter_dir`: unmerged PeftModel, or merged into plain weights."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise InputError("adapter folder has no adapter_config.json", adapter_dir)
    try:
        config = LoraConfig.from_pretrained(str(adapter_dir))
    except (ValueError, TypeError, OSError) as exc:
        raise InputError(f"cannot read adapter_config.json: {exc}", config_file) from exc
    config.inference_mode = True
    config.base_model_name_or_path = lm.__dict__.get("name_or_path") or None  # we built the base
    try:
        model = get_peft_model(lm, config)
    except ValueError as exc:  # target modules not found in the LM
        raise MismatchError(f"adapter does not fit the language model: {exc}", adapter_dir) from exc
    result = set_peft_model_state_dict(model, _adapter_state_dict(adapter_dir))
    if result.unexpected_keys:
        raise MismatchError(f"adapter tensors with no place in the model: {result.unexpected_keys[:3]}", adapter_dir)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise MismatchError(f"adapter tensors missing: {missing[:3]} ({len(missing)} in all)", adapter_dir)
    model.eval()
    if mode == "peft":
        return model
    merged = model.merge_and_unload()
    for name, param in merged.named_parameters():
        if not torch.isfinite(param).all():
            raise NumericsError(f"merged weight {name} has NaN/Inf", adapter_dir)
    return merged


class TorchLlava:
    """CLIP vision tower + projector + LLaMA, evaluated in `dtype` on CPU, answers as numpy."""

    def __init__(self, ckpt: Checkpoint, vision: CLIPVisionModel, projector: nn.Module, lm: nn.Module,
                 dtype: torch.dtype):
        self.ckpt, self.vision, self.projector, self.lm, self.dtype = ckpt, vision, projector, lm, dtype
        self._embed_tokens = lm.get_input_embeddings()

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, *, adapter: AdapterMode | None = None,
                        dtype: torch.dtype = torch.float32) -> "TorchLlava":
        if adapter not in (None, "peft", "merged"):
            raise ConfigError(f"adapter must be None, 'peft' or 'merged', not {adapter!r}")
        if adapter is not None and ckpt.adapter_dir is None:
            raise ConfigError(f"adapter={adapter!r} asked for, but the checkpoint has no LoRA adapter", ckpt.root)
        vision, projector, lm = build_loaded(ckpt, dtype)
        lm.eval()
        if adapter is not None:
            lm = apply_adapter(lm, Path(ckpt.adapter_dir), adapter)
        return cls(ckpt, vision.eval(), projector.eval(), lm, dtype)

    # -- vision ---------------------------------------------------------------------------------
    def pixel_values(self, image: ImageSource) -> np.ndarray:
        """float32 [1, 3, S, S]: edge.image's pad + resize, then CLIP normalisation."""
        spec = self.ckpt.vision
        arr = prepare_image(image, spec.image_size, spec.pad_color)
        return normalize(arr, spec.image_mean, spec.image_std)[None]

    @torch.inference_mode()
    def _image_embeddings(self, image: ImageSource) -> torch.Tensor:
        spec = self.ckpt.vision
        pixels = torch.from_numpy(self.pixel_values(image)).to(self.dtype)
        out = self.vision(pixel_values=pixels, output_hidden_states=True)
        features = out.hidden_states[spec.feature_layer]
        if spec.select_feature == "patch":
            features = features[:, 1:]
        return self.projector(features)[0]

    def image_embeddings(self, image: ImageSource) -> np.ndarray:
        """float32 [tokens, n_embd]: what LLaVA splices into the prompt for this image."""
        return self._image_embeddings(image).float().numpy()

    # -- language model -------------------------------------------------------------------------
    def _segment_embeddings(self, segment: Segment) -> torch.Tensor:
        if isinstance(segment, np.ndarray) and np.issubdtype(segment.dtype, np.floating):
            if segment.ndim != 2 or segment.shape[1] != self.ckpt.text.hidden_size:
                raise InputError(f"image embeddings must be [tokens, {self.ckpt.text.hidden_size}], "
                                 f"got {segment.shape}")
            return torch.from_numpy(np.ascontiguousarray(segment)).to(self.dtype)
        if isinstance(segment, (list, tuple)):
            ids = torch.tensor(list(segment), dtype=torch.long)
            if ids.numel() and (ids.min() < 0 or ids.max() >= self.ckpt.text.vocab_size):
                raise InputError(f"token id out of range 0..{self.ckpt.text.vocab_size - 1}")
            return self._embed_tokens(ids)
        return self._image_embeddings(segment)

    @torch.inference_mode()
    def input_embeddings(self, segments: Sequence[Segment]) -> torch.Tensor:
        """[1, T, n_embd]: token embeddings with image embeddings spliced in at their place."""
        parts = [self._segment_embeddings(s) for s in segments]
        parts = [p for p in parts if p.shape[0]]
        if not parts:
            raise InputError("empty prompt")
        return torch.cat(parts, dim=0)[None]

    @torch.inference_mode()
    def logits(self, segments: Sequence[Segment]) -> np.ndarray:
        """float32 [T, vocab] for every position of the prompt (one causal forward, no cache)."""
        out = self.lm(inputs_embeds=self.input_embeddings(segments), use_cache=False)
        return out.logits[0].float().numpy()

    @torch.inference_mode()
    def greedy(self, segments: Sequence[Segment], n_tokens: int, *, stop_at_eos: bool = True) -> list[int]:
        """Up to `n_tokens` argmax tokens (KV-cached); with `stop_at_eos` the EOS ends it, included."""
        out = self.lm(inputs_embeds=self.input_embeddings(segments), use_cache=True)
        tokens: list[int] = []
        while len(tokens) < n_tokens:
            token = int(out.logits[0, -1].float().argmax())
            tokens.append(token)
            if (stop_at_eos and token == self.ckpt.text.eos_token_id) or len(tokens) == n_tokens:
                break
            cache = getattr(out, CACHE_KW)
            out = self.lm(input_ids=torch.tensor([[token]]), use_cache=True, **{CACHE_KW: cache})
        return tokens
