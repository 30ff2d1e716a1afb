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
with the same inputs returns the finished folder at once. Presets (recipe_config.py, recipe_smol.py):
"cpu" (the demo's budget: ~9 minutes on 2 cores), "gpu" (bigger world, longer runs; minutes on one
H100), "micro" (tests); on the tiny LLaMA or on SmolLM2-135M (`lm`), which adds LLaVA's stage 1
(projector pretraining) before SFT.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from factedge.convert.layouts import RLHF_ADAPTER_DIR, RLHF_SFT_DIR, resolve_vision_tower
from factedge.edge.errors import OutputError
from factedge.train.base.base_model import cached_base
from factedge.train.config import ModelConfig, SFTConfig
from factedge.train.recipe_config import RecipeConfig, recipe_base, tiny_preset
from factedge.train.recipe_smol import smol_preset
from factedge.train.rm.model import RM_DIR

Log = Callable[[str], None]
StageProgress = Callable[[str, int, int, dict], None]  # (stage, done, total, metrics)
ROOT_NAME = "LLaVA-RLHF-shapes"
__all__ = ["RecipeConfig", "RecipeResult", "assemble", "recipe_base", "recipe_key", "recipe_preset", "run_recipe",
           "train_rm_stage", "write_world_files"]


def recipe_preset(scale: str = "cpu", seed: int = 0, lm: str = "llama") -> RecipeConfig:
    """micro (tests, seconds) | cpu (the demo: ~9 minutes on 2 cores) | gpu (one GPU). lm "llama": the
    tiny LLaMA trained from scratch (recipe_config.py); "smollm2": the recipe on SmolLM2-135M
    (recipe_smol.py; "smollm2-init" its structure at test size)."""
    return tiny_preset(scale, seed) if lm == "llama" else smol_preset(scale, seed, lm)


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
    if cfg.pretrain is not None:
        base = _timed("pretrain", lambda: _sft(cfg.pretrain, world, base, work, "pretrain", progress), log, timings)
        rows = _run_metrics(work / "runs" / "pretrain")
        metrics["pretrain"] = _throughput(rows, timings["pretrain"], _sft_samples(world, cfg.pretrain))
        metrics["pretrain"]["final"] = _last(work / "runs" / "pretrain")
    sft_out = _timed("sft", lambda: _sft(cfg.sft, world, base, work, "sft", progress), log, timings)
    metrics["sft"] = _throughput(_run_metrics(work / "runs" / "sft"), timings["sft"], _sft_samples(world, cfg.sft))
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


def _sft_samples(world, cfg: SFTConfig) -> int:
    n = int(world.counts.get("sft", 0) * cfg.optim.epochs)
    if cfg.optim.max_steps > 0:
        n = min(n, cfg.optim.max_steps * cfg.optim.batch_size)
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


def _sft(cfg: SFTConfig, world, base: Path, work: Path, stage: str, progress) -> Path:
    """An SFT-style stage (projector pretraining or SFT) on the world's conversations."""
    from factedge.train.sft import train_sft

    c = dataclasses.replace(cfg, model=_model_cfg(cfg.model, base), data=str(world.sft),
                            run=dataclasses.replace(cfg.run, out=str(work / "runs" / stage)))
    return Path(train_sft(c, _stage_progress(progress, stage)).output)


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
