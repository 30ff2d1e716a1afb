"""Write a trained model back in the real layouts: an original-LLaVA `LlavaLlamaForCausalLM` folder.

This is what LLaVA-RLHF ships as `sft_model/` and what `convert.layouts.load_checkpoint` and
`factedge convert` read: config.json as LLaVA training writes it (via `train.tiny`'s writer, the
one place that knows those keys), `model.mm_projector.*` beside the LLaMA weights (a bare
`nn.Linear` for the linear projector, `nn.Sequential` indices for mlp2x_gelu), tokenizer files
copied from the base, `mm_vision_tower` pointing at the base's CLIP folder. A llava-hf base has no
CLIP folder, so its vision tower is written beside the model as one. The folder is staged under a
temp name and renamed into place.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from factedge.edge.atomic import building_dir
from factedge.convert.layouts import TOKENIZER_FILES
from factedge.convert.reference import vision_config
from factedge.edge.errors import OutputError
from factedge.train.base import tiny
from factedge.train.model import LlavaForTraining
from factedge.train.base.tensor_files import WeightFormat, save_checkpoint, save_tensors, write_hf_json

def projector_state(model: LlavaForTraining, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The projector under LLaVA's names: `weight`/`bias` of a bare nn.Linear for "linear",
    nn.Sequential indices (`0.weight`, `2.weight`...) for mlp2x_gelu."""
    proj = {k: v.detach().to(dtype) for k, v in model.projector.state_dict().items()}
    if model.ckpt.projector_type == "linear":
        proj = {k.removeprefix("0."): v for k, v in proj.items()}
    return proj


def llava_state_dict(model: LlavaForTraining, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """LLaMA weights (`model.*`, `lm_head.weight`) + `model.mm_projector.*`, LoRA merged if present."""
    lm = model.causal_lm()
    if hasattr(model.lm, "peft_config"):  # a PeftModel: save the merged weights, leave the model as it is
        raise OutputError("cannot write a full LLaVA folder from a LoRA model; save the adapter instead")
    sd = {k: v.detach().to(dtype) for k, v in lm.state_dict().items()}
    head = sd.pop("lm_head.weight")
    sd.update({f"model.mm_projector.{k}": v for k, v in projector_state(model, dtype).items()})
    sd["lm_head.weight"] = head
    return sd


def write_vision_tower(model: LlavaForTraining, folder: Path) -> Path:
    """A CLIPVisionModel folder (config + model.safetensors + preprocessor config) from the model's
    frozen tower, for bases whose tower lives inside the checkpoint (llava-hf)."""
    spec = model.ckpt.vision
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "" if hasattr(model.vision, "vision_model") else "vision_model."
    sd = {prefix + k: v for k, v in model.vision.state_dict().items() if not k.endswith("position_ids")}
    save_tensors(folder / "model.safetensors", sd, "safetensors")
    cfg = vision_config(spec).to_dict()
    cfg.update(architectures=["CLIPVisionModel"], model_type="clip_vision_model")
    write_hf_json(folder / "config.json", {k: v for k, v in cfg.items() if not k.startswith("_")})
    write_hf_json(folder / "preprocessor_config.json", {
        "crop_size": spec.image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "image_mean": list(spec.image_mean), "image_std": list(spec.image_std), "resample": 3,
        "size": spec.image_size, "feature_extractor_type": "CLIPFeatureExtractor"})
    return folder


def write_llava_model(model: LlavaForTraining, out: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                      fmt: WeightFormat = "safetensors") -> Path:
    """Write `model` (full weights) as an original-LLaVA folder at `out`; returns `out`."""
    out = Path(out)
    ckpt = model.ckpt
    with building_dir(out, "the model folder") as tmp:
        clip_dir = model.vision_tower_dir
        if clip_dir is None:
            clip_dir = write_vision_tower(model, out.parent / f"{out.name}-vision-tower")
        save_checkpoint(tmp, llava_state_dict(model, dtype), fmt)
        write_hf_json(tmp / "config.json", tiny.llava_config(ckpt.text, ckpt.vision, ckpt.projector_type,
                                                           Path(clip_dir), dtype))
        write_hf_json(tmp / "generation_config.json", tiny.generation_config(ckpt.text.pad_token_id, "4.31.0"))
        for name in TOKENIZER_FILES:
            src = Path(ckpt.tokenizer_dir) / name
            if src.is_file():
                shutil.copyfile(src, tmp / name)
    return out
