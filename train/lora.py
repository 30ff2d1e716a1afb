"""LoRA adapters on the training model's LLaMA, through peft, saved as plain PEFT folders.

Every stage that uses LoRA (RL-init SFT, the reward model, PPO's policy / value / reference /
reward adapters on one base) goes through these three functions, so adapters are named, loaded and
saved one way. Saving writes `adapter_config.json` + `adapter_model.safetensors` ourselves (peft's
`save_pretrained` puts any adapter not named "default" into a sub-folder), with the base weights'
key names exactly as PEFT/LLaVA-RLHF write them (`base_model.model.model.layers.N...lora_A.weight`),
which `factedge convert --lora` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from factedge.edge.atomic import building_dir
from factedge.convert.layouts import check_adapter_dir
from factedge.edge.errors import ConfigError, MismatchError
from factedge.train.config import LoraSettings
from factedge.train.model import LlavaForTraining


def lora_config(settings: LoraSettings, *, inference: bool = False):
    from peft import LoraConfig

    if settings.r <= 0:
        raise ConfigError(f"LoRA rank must be positive, not {settings.r}")
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.targets), bias="none", task_type="CAUSAL_LM",
                      inference_mode=inference)


def add_lora(model: LlavaForTraining, settings: LoraSettings | None = None, *, name: str = "default",
             init_from: str | Path | None = None, trainable: bool = True) -> None:
    """Add adapter `name` to `model.lm` (wrapping it in a PeftModel the first time): fresh from
    `settings`, or loaded from the PEFT folder `init_from`. Makes it the active adapter; base
    weights are frozen by peft. `trainable=False` freezes the adapter too (reference / reward)."""
    from peft import PeftModel, get_peft_model

    lm = model.lm
    is_peft = isinstance(lm, PeftModel)
    if is_peft and name in lm.peft_config:
        raise ConfigError(f"adapter {name!r} already exists")
    if init_from is not None:
        folder = check_adapter_dir(init_from)
        try:
            if is_peft:
                lm.load_adapter(str(folder), adapter_name=name, is_trainable=trainable)
            else:
                lm = PeftModel.from_pretrained(lm, str(folder), adapter_name=name, is_trainable=trainable)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise MismatchError(f"adapter does not fit the model: {exc}", folder) from exc
    else:
        cfg = lora_config(settings or LoraSettings())
        if is_peft:
            lm.add_adapter(name, cfg)
        else:
            lm = get_peft_model(lm, cfg, adapter_name=name)
    model.lm = lm
    flags = {n: p.requires_grad for n, p in lm.named_parameters()}  # peft's set_adapter flips them
    lm.set_adapter(name)
    for pname, p in lm.named_parameters():
        if f".{name}." in pname and "lora_" in pname:
            p.requires_grad_(trainable)
        elif pname in flags:
            p.requires_grad_(flags[pname])


def lora_parameters(model: LlavaForTraining, name: str = "default") -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters of adapter `name`, by their full module name."""
    return {n: p for n, p in model.lm.named_parameters() if "lora_" in n and f".{name}." in n}


def save_lora(model: LlavaForTraining, out: str | Path, *, name: str = "default", base: str | Path | None = None,
              extra: dict[str, dict[str, torch.Tensor]] | None = None,
              metadata: dict[str, dict[str, str]] | None = None) -> Path:
    """Write adapter `name` to the PEFT folder `out` (atomic: a temp folder renamed into place);
    `extra`: more weight files to put in the folder (file name -> tensors; .bin: a torch pickle),
    `metadata`: text fields for an extra safetensors file's header."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    lm = model.lm
    if not hasattr(lm, "peft_config") or name not in lm.peft_config:
        raise ConfigError(f"the model has no LoRA adapter {name!r}")
    out = Path(out)
    state = get_peft_model_state_dict(lm, adapter_name=name)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    cfg = lm.peft_config[name].to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    cfg["base_model_name_or_path"] = str(base) if base is not None else cfg.get("base_model_name_or_path")
    cfg["inference_mode"] = True
    with building_dir(out, "the adapter") as tmp:
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        for fname, tensors in (extra or {}).items():
            tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
            if fname.endswith(".bin"):  # LLaVA's non_lora_trainables.bin is a torch pickle
                torch.save(tensors, tmp / fname)
            else:
                save_file(tensors, str(tmp / fname), metadata={"format": "pt", **(metadata or {}).get(fname, {})})
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n", "utf-8")
    return out


def use_adapter(model: LlavaForTraining, name: str) -> None:
    """Make `name` the active adapter WITHOUT changing which parameters train (peft's `set_adapter`
    also flips requires_grad: the active one on, all others off, which would silently freeze a
    policy while the reward adapter scores, or unfreeze the reward adapter)."""
    lm = model.lm
    if not hasattr(lm, "peft_config") or name not in lm.peft_config:
        raise ConfigError(f"the model has no LoRA adapter {name!r}")
    if lm.active_adapter == name:
        return
    flags = {n: p.requires_grad for n, p in lm.named_parameters()}
    lm.set_adapter(name)
    for n, p in lm.named_parameters():
        p.requires_grad_(flags[n])
