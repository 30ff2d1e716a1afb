"""Alignment methods side by side on one recipe (issue #16): which one lowers hallucination, and at
what cost in coverage.

From a finished recipe (the demo's: `<cache>/demo/recipe/recipe-<key>`, holding LLaVA-RLHF-shapes/ and
its world), each method trains a policy LoRA from the same SFT model, then every policy answers the
held-out split greedily and a fresh shapes-POPE (adversarial negatives, a seed the world never used):
hallucination rate, coverage of the scene's objects, claim precision, yes/no and multiple-choice
accuracy, answer length, POPE F1 and yes-ratio, and the training seconds of each method.

    python -m bench.probes.align_compare RECIPE_DIR [--methods sft,ppo_fact_rm,dpo,...] [--seed 0]
        [--pope-images 100] [--json OUT] [--set METHOD:key=value ...]

Methods (METHODS below, as data): the recipe's own PPO + fact RM policy, PPO + oracle, offline DPO on
the world's fact-checked pairs, DPO with mDPO's image-conditional pairs, on-policy DPO ranked by the
oracle or by the fact RM, and on-policy DPO with the reference answer as the chosen side (POVID /
HA-DPO) beside its NLL-only control.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from bench.common import ensure_factedge, print_figures

# name -> (stage, overrides on top of the recipe preset's PPO settings); None: no training
ON_POLICY = ("pairs=on_policy", "samples_per_prompt=4", "rollout.batch_size=32", "rollout.micro_batch_size=32",
             "max_steps=150", "step_batch_size=8", "step_micro_batch_size=8", "optim.lr=5e-4", "nll_weight=0.5",
             "reward.length_score=0")
METHODS: dict[str, tuple[str, tuple[str, ...]] | None] = {
    "sft": None,
    "ppo_fact_rm": None,  # the recipe's own policy
    "ppo_oracle": ("ppo", ("reward.source=oracle", "reward.whiten_rewards=true", "optim.lr=1e-4",
                           "optim.scheduler=constant", "max_steps=200", "epochs=10")),
    "dpo": ("dpo", ("epochs=2", "optim.lr=2e-4", "nll_weight=1.0")),
    "dpo_image": ("dpo", ("epochs=2", "optim.lr=2e-4", "nll_weight=1.0", "image_pairs=true", "anchor_weight=1.0")),
    "dpo_on_policy_oracle": ("dpo", (*ON_POLICY, "reward.source=oracle", "reward.oracle_score=objects",
                                     "reward.oracle_false_weight=1.0")),
    "dpo_on_policy_rm": ("dpo", ON_POLICY),
    # POVID / HA-DPO: the reference answer ≻ the sample the fact RM ranks worst; and its control, the
    # same run with β so small that only the NLL on the reference trains (what the pairs add beyond SFT)
    "dpo_reference_rm": ("dpo", (*ON_POLICY, "chosen=reference")),
    "nll_reference": ("dpo", (*ON_POLICY, "chosen=reference", "beta=0.0001")),
}
ROWS = [("hallucination rate", "hallucination_rate"), ("objects covered (all answers)", "coverage"),
        ("describe: hallucination rate", "describe_hallucination_rate"),
        ("describe: objects covered", "describe_coverage"), ("claim precision", "claim_precision"),
        ("yes/no accuracy", "yes_no_accuracy"), ("multiple-choice accuracy", "multiple_choice_accuracy"),
        ("POPE adversarial F1", "pope_f1"), ("POPE yes-ratio", "pope_yes_ratio"),
        ("mean answer tokens", "mean_tokens"), ("training seconds", "train_s")]


def recipe_lm(recipe: Path) -> str:
    """The LM the recipe trained ("llama", "smollm2"), from its recipe.json."""
    import json

    return json.loads((recipe / "recipe.json").read_text())["config"]["base"].get("lm", "llama")


def stage_config(stage: str, recipe: Path, scale: str, seed: int, out: Path, overrides: list[str]):
    """The recipe preset's PPO settings pointed at the recipe's SFT model, world and RM; for DPO the
    same model, LoRA, rollout and reward settings with the DPO defaults for the rest."""
    from factedge.edge.atomic import write_json
    from factedge.train.config import config_to_dict, load_config
    from factedge.train.dpo.config import DPOConfig
    from factedge.train.recipe import recipe_preset
    from factedge.train.rl.config import PPOConfig

    root, world = recipe / "LLaVA-RLHF-shapes", recipe / "world"
    ppo = recipe_preset(scale, seed, recipe_lm(recipe)).ppo
    reward = dataclasses.replace(ppo.reward, adapter=str(root / "rm_lora_adapter_model"),
                                 facts=str(world / "image_to_caption.json"), scenes=str(world / "scenes.json"))
    shared = dict(model=dataclasses.replace(ppo.model, base=str(root / "sft_model")), lora=ppo.lora,
                  data=str(world / "ppo_prompts.json"), reward=reward, rollout=ppo.rollout,
                  run=dataclasses.replace(ppo.run, out=str(out)))
    if stage == "ppo":
        cls, cfg = PPOConfig, dataclasses.replace(ppo, **shared)
    else:
        cls, cfg = DPOConfig, DPOConfig(**shared, preference=str(world / "preference.json"))
    base = write_json(out.parent / f"{out.name}.config.json", config_to_dict(cfg))
    return load_config(cls, base, [f"--{o}" for o in overrides])


def train(name: str, recipe: Path, scale: str, seed: int, work: Path, extra: list[str]) -> tuple[Path | None, float]:
    """(policy adapter folder or None for SFT, training seconds) of method `name`."""
    from factedge.train.dpo.trainer import train_dpo
    from factedge.train.rl.ppo import train_ppo

    if name == "sft":
        return None, 0.0
    if name == "ppo_fact_rm":
        return recipe / "LLaVA-RLHF-shapes" / "rlhf_lora_adapter_model", 0.0
    stage, overrides = METHODS[name]
    cfg = stage_config(stage, recipe, scale, seed, work / f"{name}-{seed}", [*overrides, "run.resume=false", *extra])
    t0 = time.perf_counter()
    result = (train_ppo if stage == "ppo" else train_dpo)(cfg)
    return Path(result.output) / "rlhf_lora_adapter_model", time.perf_counter() - t0


def pope_items(out: Path, seed: int, n_images: int) -> tuple[list[dict], Path, list[str]]:
    """A fresh shapes-POPE (adversarial) as held-out-style items (+ its image folder and labels)."""
    import json

    from factedge.train.evaluate.pope import PROMPT_SUFFIX
    from factedge.train.world.benchmarks import write_shapes_pope
    from factedge.train.world.scene import WorldConfig

    files = write_shapes_pope(out, n=n_images, seed=seed, split="adversarial", cfg=WorldConfig(image_size=112))
    rows = [json.loads(line) for line in Path(files.questions).read_text().splitlines() if line.strip()]
    items = [{"image": r["image"],
              "conversations": [{"from": "human", "value": "<image>\n" + r["text"] + PROMPT_SUFFIX}]} for r in rows]
    return items, Path(files.images), [r["label"] for r in rows]


def evaluate(recipe: Path, adapter: Path | None, pope: tuple[list[dict], Path, list[str]], max_new_tokens: int) -> dict:
    from factedge.train.evaluate.pope import PopeMetrics, parse_yes_no
    from factedge.train.heldout_eval import evaluate_model, greedy_answers
    from factedge.train.lora import add_lora
    from factedge.train.model import load_for_training

    model = load_for_training(recipe / "LLaVA-RLHF-shapes" / "sft_model")
    if adapter is not None:
        add_lora(model, init_from=adapter, name="policy", trainable=False)
    res = evaluate_model(model, recipe / "world" / "heldout", max_new_tokens=max_new_tokens, batch=64, examples=3)
    items, images, labels = pope
    answers = greedy_answers(model, items, images, max_new_tokens=16, batch=64)
    m = PopeMetrics.compute([parse_yes_no(a[0]) for a in answers], labels)
    return res | {"pope_f1": m.f1, "pope_yes_ratio": m.yes_ratio, "pope_accuracy": m.accuracy}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--scale", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pope-images", type=int, default=100)
    ap.add_argument("--pope-seed", type=int, default=9173)
    ap.add_argument("--work", type=Path, default=Path(".cache/align_compare"))
    ap.add_argument("--set", action="append", default=[], help="METHOD:key=value, an extra override of one method")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    ensure_factedge()
    from factedge.edge.atomic import write_json
    from factedge.train.recipe import recipe_preset

    names = [m for m in args.methods.split(",") if m]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    extra = {m: [s.split(":", 1)[1] for s in args.set if s.split(":", 1)[0] == m] for m in names}
    pope = pope_items(args.work / f"pope-{args.pope_seed}", args.pope_seed, args.pope_images)
    max_new = recipe_preset(args.scale, args.seed, recipe_lm(args.recipe)).ppo.rollout.max_new_tokens
    res = {}
    for name in names:
        adapter, seconds = train(name, args.recipe, args.scale, args.seed, args.work, extra[name])
        res[name] = evaluate(args.recipe, adapter, pope, max_new) | {"train_s": seconds}
        print(f"{name}: hallucination {res[name]['hallucination_rate']:.3f}, coverage {res[name]['coverage']:.3f}, "
              f"POPE F1 {res[name]['pope_f1']:.3f} (trained {seconds:.0f} s)", flush=True)
    print(f"\nheld-out {next(iter(res.values()))['n']} answers; POPE {len(pope[2])} questions (adversarial)\n")
    print_figures(res, ROWS)
    if args.json:
        write_json(args.json, {"recipe": str(args.recipe), "seed": args.seed, "methods": {m: METHODS[m] for m in names},
                               "extra": extra, "eval": res}, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
