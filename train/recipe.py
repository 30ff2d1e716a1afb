"""The whole Fact-RLHF recipe in one call: world -> base -> SFT (full FT) -> fact RM -> PPO (policy LoRA).

`run_recipe` chains the stages' own trainers (sft.train_sft, rm.train_rm, ppo.train_ppo) on a shapes
world and assembles what LLaVA-RLHF ships, so `factedge convert` takes the result directly:

    root/ sft_model/                 full LlavaLlamaForCausalLM (mm_vision_tower = "../<clip>", relative,
                                     so the folder can be moved or copied)
          <clip folder>/             the frozen CLIP tower
          rlhf_lora_adapter_model/   the PPO policy LoRA
          rm_lora_adapter_model/     the fact-augmented reward model (LoRA + reward_head.safetensors)
          recipe.json                config, metrics (per stage: final losses, held-out RM accuracy,
                                     throughput), timings

Everything is cached by a content hash of the config and the bytes of train/'s sources: a second call
with the same inputs returns the finished folder at once. Presets: "cpu" (the demo's budget: ~9
minutes on 2 cores), "gpu" (bigger world, longer runs; minutes on one H100), "micro" (tests).

Why the base looks as it does (see `recipe_base`): 112 px with 16-px patches (49 tokens) and a 2-layer
ViT, whose first layer is *pretrained on the world* (`vision_pretrain.py`, the stand-in for CLIP's own
pretraining) before the LLaVA stages, which keep it frozen. With a random tower the tiny LM learnt the
language but not the image (answer loss with the right image == with a shuffled one, even after
thousands of fresh images on an H100); with the pretrained tower, 600 SFT steps on 2 CPU cores give a
held-out answer loss of 0.216 with the right image vs 0.668 with a shuffled one (bench/probes/image_use.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from factedge.convert.layouts import RLHF_ADAPTER_DIR, RLHF_SFT_DIR, resolve_vision_tower
from factedge.convert.specs import TextSpec, VisionSpec
from factedge.edge.errors import ConfigError, OutputError
from factedge.train.base.base_model import BaseSpec, cached_base
from factedge.train.config import LoraSettings, ModelConfig, OptimSettings, RunSettings, SFTConfig
from factedge.train.rm.config import RMConfig
from factedge.train.rm.model import RM_DIR
from factedge.train.rl.config import PPOConfig, RewardSettings, RLOptim, RolloutSettings
from factedge.train.base.vision_pretrain import VisionPretrain
from factedge.train.world.scene import WorldConfig

Log = Callable[[str], None]
StageProgress = Callable[[str, int, int, dict], None]  # (stage, done, total, metrics)
ROOT_NAME = "LLaVA-RLHF-shapes"


def recipe_base(seed: int = 0, *, hidden: int = 256, layers: int = 4, mlp: int = 688,
                pretrain: VisionPretrain | None = None) -> BaseSpec:
    """112 px / 16-px patches (49 tokens), 2 ViT layers (features = output of layer 1), the tower
    pretrained on the world (`pretrain`, default VisionPretrain()); LLaMA vocab 32000."""
    vision = VisionSpec(image_size=112, patch_size=16, hidden_size=128, intermediate_size=256, num_layers=2,
                        num_heads=4)
    text = TextSpec(vocab_size=32000, hidden_size=hidden, intermediate_size=mlp, num_layers=layers, num_heads=4,
                    num_kv_heads=4, max_position_embeddings=2048)
    return BaseSpec(text=text, vision=vision, projector="mlp2x_gelu", seed=seed,
                    vision_pretrain=pretrain or VisionPretrain(seed=seed))


@dataclass
class RecipeConfig:
    """Every knob of the recipe; the stage configs' data/model/out paths are filled in by `run_recipe`."""

    n_images: int = 3000
    seed: int = 0
    world: WorldConfig = field(default_factory=lambda: WorldConfig(image_size=112))
    base: BaseSpec = field(default_factory=recipe_base)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    plain_rm: bool = False  # also train the RM without facts (same data and budget), for the comparison
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda
    threads: int = 0  # torch CPU threads (0: leave torch's setting)
    scale: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _lora(r: int) -> LoraSettings:
    return LoraSettings(r=r, alpha=2 * r)


def recipe_preset(scale: str = "cpu", seed: int = 0) -> RecipeConfig:
    """micro (tests, seconds) | cpu (the demo: ~9 minutes on 2 cores) | gpu (one H100; not yet timed with
    the pretrained tower)."""
    if scale not in ("micro", "cpu", "gpu"):
        raise ConfigError(f"scale must be micro, cpu or gpu, not {scale!r}")
    gpu = scale == "gpu"
    pick = lambda micro, cpu, gpu_: {"micro": micro, "cpu": cpu, "gpu": gpu_}[scale]  # noqa: E731
    pretrain = VisionPretrain(steps=pick(3, 1500, 3000), batch_size=pick(4, 32, 64), seed=seed)
    base = recipe_base(seed, pretrain=pretrain) if gpu else recipe_base(
        seed, hidden=pick(64, 128, 0), layers=2, mlp=pick(128, 344, 0), pretrain=pretrain)
    mdl = ModelConfig(dtype="float32")
    sft_batch = pick(8, 32, 64)
    sft = SFTConfig(model=mdl, mode="full", max_length=256, save_dtype="float32",
                    optim=OptimSettings(lr=1e-3, epochs=pick(1.0, 1.0, 3.0), batch_size=sft_batch,
                                        micro_batch_size=sft_batch, warmup_ratio=0.03, max_steps=pick(2, 600, 0)),
                    run=RunSettings(seed=seed, resume=False))
    rm_batch = pick(8, 16, 32)
    rm = RMConfig(model=mdl, use_facts=True, lora=_lora(16), max_length=512, eval_size=0, eval_every=0,
                  optim=OptimSettings(lr=1e-3, scheduler="constant_with_warmup", epochs=1.0, batch_size=rm_batch,
                                      micro_batch_size=rm_batch, warmup_ratio=0.03, max_steps=pick(2, 120, 240)),
                  run=RunSettings(seed=seed, resume=False))
    roll, max_new = pick(4, 16, 128), pick(8, 56, 64)  # the longest world description is 49 tokens + EOS
    # the paper's length rate: -10 per 896 tokens, whatever max_new_tokens is (the term scales by it)
    reward = RewardSettings(use_facts=True, length_score=-10.0 * max_new / 896)
    ppo = PPOConfig(model=mdl, lora=_lora(16), epochs=1.0, max_steps=pick(1, 40, 60), step_batch_size=roll,
                    step_micro_batch_size=roll, ppo_epochs=2,
                    rollout=RolloutSettings(max_new_tokens=max_new, batch_size=roll, micro_batch_size=roll, log=False),
                    reward=reward,
                    optim=RLOptim(lr=pick(1e-3, 2e-4, 2e-4), warmup_steps=1),
                    run=RunSettings(seed=seed, resume=False, save_every=0))
    return RecipeConfig(n_images=pick(40, 1000, 6000), seed=seed, base=base, sft=sft, rm=rm, ppo=ppo, scale=scale)


@dataclass
class RecipeResult:
    root: Path  # the LLaVA-RLHF layout folder
    world: Any  # WorldFiles (train split; `.heldout` the held-out one)
    metrics: dict[str, Any]
    cached: bool
    plain_rm: Path | None = None  # the RM trained without facts (when cfg.plain_rm)


def source_hash() -> str:
    """sha256 over the sources that shape the trained weights (world included, so data changes count);
    the demo, the CLIs and evaluation do not, so editing them never forces a retrain."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(p for p in here.rglob("*.py") if _shapes_weights(p.relative_to(here))):
        h.update(path.relative_to(here).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _shapes_weights(rel: Path) -> bool:
    name = rel.name
    return not ("evaluate" in rel.parts or "demo" in rel.parts or name.endswith("_cli.py")
                or name in ("heldout_eval.py", "tiny_cache.py"))


def recipe_key(cfg: RecipeConfig) -> str:
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    h.update(source_hash().encode())
    return h.hexdigest()[:16]


def _device(cfg: RecipeConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def _timed(stage: str, fn, log: Log, timings: dict) -> Any:
    log(f"{stage}...")
    t0 = time.perf_counter()
    out = fn()
    timings[stage] = round(time.perf_counter() - t0, 2)
    log(f"{stage} done in {timings[stage]:.1f} s")
    return out


def _stage_progress(progress: StageProgress | None, stage: str):
    return None if progress is None else (lambda done, total, m: progress(stage, done, total, m))


def _run_metrics(run_path: Path) -> list[dict]:
    from factedge.train.run_dir import iter_metrics

    return list(iter_metrics(run_path)) if (Path(run_path) / "metrics.jsonl").is_file() else []


def _throughput(rows: list[dict], seconds: float, samples: int) -> dict[str, float]:
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return {"seconds": seconds, "samples": samples, "samples_per_s": samples / max(seconds, 1e-9),
            "tokens_per_s": sum(tps) / len(tps) if tps else float("nan")}


def run_recipe(cfg: RecipeConfig, cache_dir: str | Path, progress: StageProgress | None = None,
               log: Log | None = None) -> RecipeResult:
    """Run (or fetch from `cache_dir`) the recipe; see the module doc."""
    from factedge.train.world.export import write_world

    log = log or (lambda _m: None)
    cache = Path(cache_dir)
    folder = cache / f"recipe-{recipe_key(cfg)}"
    done = folder / "recipe.json"
    if done.is_file():
        meta = json.loads(done.read_text())
        world = write_world_files(folder / "world")
        plain = folder / "plain_rm" if (folder / "plain_rm").is_dir() else None
        return RecipeResult(folder / meta["root"], world, meta["metrics"], True, plain)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg)
    work = cache / f".recipe-{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    timings: dict[str, float] = {}
    metrics: dict[str, Any] = {"device": device, "timings": timings}
    world = _timed("world", lambda: write_world(work / "world", cfg.n_images, cfg.seed, cfg.world), log, timings)
    base = _timed("base", lambda: cached_base(cfg.base, cache / "bases"), log, timings)
    sft_out = _timed("sft", lambda: _sft(cfg, world, base, work, progress), log, timings)
    metrics["sft"] = _throughput(_run_metrics(work / "runs" / "sft"), timings["sft"], _sft_samples(world, cfg))
    metrics["sft"]["final"] = _last(work / "runs" / "sft")
    rm_out = _timed("rm", lambda: train_rm_stage(cfg, world, sft_out, work, "rm", True, progress), log, timings)
    metrics["rm"] = _last(work / "runs" / "rm") | {"seconds": timings["rm"]}
    if cfg.plain_rm:
        _timed("rm_plain", lambda: train_rm_stage(cfg, world, sft_out, work, "rm_plain", False, progress), log, timings)
        metrics["rm_plain"] = _last(work / "runs" / "rm_plain") | {"seconds": timings["rm_plain"]}
    ppo_out = _timed("ppo", lambda: _ppo(cfg, world, sft_out, rm_out, work, progress), log, timings)
    rows = _run_metrics(work / "runs" / "ppo")
    metrics["ppo"] = {"seconds": timings["ppo"], "steps": rows,
                      "samples_per_s": _mean([r.get("samples_per_s") for r in rows]),
                      "rollout_tokens_per_s": _mean([r.get("rollout_tokens_per_s") for r in rows])}
    assemble(work / ROOT_NAME, sft_out, ppo_out / RLHF_ADAPTER_DIR, rm_out)
    if cfg.plain_rm:
        os.replace(work / "runs" / "rm_plain" / RM_DIR, work / "plain_rm")
    shutil.rmtree(work / "runs", ignore_errors=True)
    meta = {"root": ROOT_NAME, "config": cfg.to_dict(), "metrics": metrics, "key": folder.name}
    tmp = work / "recipe.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1, default=str) + "\n")
    os.replace(tmp, work / "recipe.json")
    try:
        os.replace(work, folder)
    except OSError:  # another process finished first: keep theirs
        if not done.is_file():
            raise OutputError("cannot move the finished recipe into place", folder)
        shutil.rmtree(work, ignore_errors=True)
    world = write_world_files(folder / "world")
    plain = folder / "plain_rm" if (folder / "plain_rm").is_dir() else None
    return RecipeResult(folder / ROOT_NAME, world, metrics, False, plain)


def _mean(xs) -> float:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def _last(run_path: Path) -> dict:
    rows = _run_metrics(run_path)
    out: dict = {}
    for r in rows:
        out.update(r)
    return out


def _sft_samples(world, cfg: RecipeConfig) -> int:
    n = int(world.counts.get("sft", 0) * cfg.sft.optim.epochs)
    if cfg.sft.optim.max_steps > 0:
        n = min(n, cfg.sft.optim.max_steps * cfg.sft.optim.batch_size)
    return n


def write_world_files(root: Path):
    """The WorldFiles of an already written world folder (train split + held-out)."""
    from factedge.train.world.export import WorldFiles

    def split(r: Path) -> WorldFiles:
        counts = json.loads((root / "world.json").read_text())["counts"]["heldout" if r != root else "train"]
        return WorldFiles(r, r / "images", r / "scenes.json", r / "sft.json", r / "image_to_caption.json",
                          r / "preference.json", r / "ppo_prompts.json", counts["images"], counts)

    files = split(root)
    files.heldout = split(root / "heldout")
    files.manifest = root / "world.json"
    return files


def _model_cfg(cfg: ModelConfig, base: Path) -> ModelConfig:
    return dataclasses.replace(cfg, base=str(base))


def _sft(cfg: RecipeConfig, world, base: Path, work: Path, progress) -> Path:
    from factedge.train.sft import train_sft

    c = dataclasses.replace(cfg.sft, model=_model_cfg(cfg.sft.model, base), data=str(world.sft),
                            run=dataclasses.replace(cfg.sft.run, out=str(work / "runs" / "sft")))
    return Path(train_sft(c, _stage_progress(progress, "sft")).output)


def train_rm_stage(cfg: RecipeConfig, world, sft: Path, work: Path, name: str, facts: bool, progress) -> Path:
    from factedge.train.rm.trainer import train_rm

    facts_file = work / "facts_all.json"  # train + held-out captions: the held-out pairs need theirs
    if not facts_file.is_file():
        merged = json.loads(world.captions.read_text()) | json.loads(world.heldout.captions.read_text())
        facts_file.write_text(json.dumps(merged) + "\n")
    c = dataclasses.replace(cfg.rm, model=_model_cfg(cfg.rm.model, sft), data=str(world.preference),
                            facts=str(facts_file), use_facts=facts, eval_data=str(world.heldout.preference),
                            run=dataclasses.replace(cfg.rm.run, out=str(work / "runs" / name)))
    return Path(train_rm(c, _stage_progress(progress, name)).output)


def _ppo(cfg: RecipeConfig, world, sft: Path, rm: Path, work: Path, progress) -> Path:
    from factedge.train.rl.ppo import train_ppo

    reward = dataclasses.replace(cfg.ppo.reward, adapter=str(rm), facts=str(world.captions))
    c = dataclasses.replace(cfg.ppo, model=_model_cfg(cfg.ppo.model, sft), data=str(world.ppo_prompts),
                            reward=reward, run=dataclasses.replace(cfg.ppo.run, out=str(work / "runs" / "ppo")))
    return Path(train_ppo(c, _stage_progress(progress, "ppo")).output)


def assemble(root: Path, sft_model: Path, policy: Path, rm: Path) -> Path:
    """Copy the three parts and the CLIP tower into `root` (LLaVA-RLHF layout, relative tower path)."""
    cfg_path = sft_model / "config.json"
    cfg = json.loads(cfg_path.read_text())
    clip = resolve_vision_tower(cfg, cfg_path, None)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    shutil.copytree(clip, root / clip.name)
    shutil.copytree(sft_model, root / RLHF_SFT_DIR, symlinks=False)
    cfg["mm_vision_tower"] = f"../{clip.name}"
    (root / RLHF_SFT_DIR / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.copytree(policy.resolve(), root / RLHF_ADAPTER_DIR)
    shutil.copytree(rm, root / RM_DIR)
    for name in (RLHF_ADAPTER_DIR, RM_DIR):
        acfg = root / name / "adapter_config.json"
        data = json.loads(acfg.read_text())
        data["base_model_name_or_path"] = f"../{RLHF_SFT_DIR}"
        acfg.write_text(json.dumps(data, indent=2) + "\n")
    return root
