"""The ceiling of the RL stage (issue #16): does PPO lower hallucination when the reward is right?

On a finished recipe (the demo's: `<cache>/demo/recipe/recipe-<key>`, holding LLaVA-RLHF-shapes/ and
the world), PPO is run again from the same SFT model with the same prompts, budget, KL and shaping,
but with `reward.source oracle` (the world's judge against the true scene, train/rl/oracle.py) in place
of the fact-augmented RM. Then, on the held-out images, greedy answers of SFT, PPO + fact RM (the
recipe's own policy) and PPO + oracle, judged: hallucination rate, coverage of the scene's objects,
mean score, claim precision, yes/no and multiple-choice accuracy, answer length.

    python -m bench.probes.oracle_ceiling RECIPE_DIR [--scale cpu] [--seed 0] [--limit 0] [--json OUT]
        [--override reward.whiten_rewards=true --override optim.lr=1e-4 ...] [--only-new]

`--override` changes the oracle run's PPO config (dotted keys, typed like `factedge train ppo`'s), to
see which optimisation change lets a perfect reward move the policy; `--only-new` skips re-evaluating
SFT and the recipe's own policy.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from bench.common import ensure_factedge, print_figures

ROWS = [("hallucination rate", "hallucination_rate"), ("objects covered (all answers)", "coverage"),
        ("describe: hallucination rate", "describe_hallucination_rate"),
        ("describe: objects covered", "describe_coverage"), ("mean judge score 0-6", "mean_score"),
        ("claim precision", "claim_precision"), ("yes/no accuracy", "yes_no_accuracy"),
        ("multiple-choice accuracy", "multiple_choice_accuracy"), ("mean answer tokens", "mean_tokens")]


def train_oracle_policy(recipe: Path, scale: str, seed: int, out: Path,
                        overrides: list[str]) -> tuple[Path, float]:
    from factedge.edge.atomic import write_json
    from factedge.train.config import config_to_dict, load_config
    from factedge.train.recipe import recipe_preset
    from factedge.train.rl.config import PPOConfig
    from factedge.train.rl.ppo import train_ppo

    root, world = recipe / "LLaVA-RLHF-shapes", recipe / "world"
    cfg = recipe_preset(scale, seed).ppo
    reward = dataclasses.replace(cfg.reward, adapter=str(root / "rm_lora_adapter_model"),
                                 facts=str(world / "image_to_caption.json"), source="oracle",
                                 scenes=str(world / "scenes.json"))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, base=str(root / "sft_model")),
                              data=str(world / "ppo_prompts.json"), reward=reward,
                              run=dataclasses.replace(cfg.run, out=str(out)))
    if overrides:
        base = write_json(out.parent / f"{out.name}.config.json", config_to_dict(cfg))
        cfg = load_config(PPOConfig, base, [f"--{o}" for o in overrides])
    t0 = time.perf_counter()
    result = train_ppo(cfg)
    return Path(result.output) / "rlhf_lora_adapter_model", time.perf_counter() - t0


def evaluate(recipe: Path, policies: dict[str, Path | None], limit: int, max_new_tokens: int) -> dict:
    from factedge.train.heldout_eval import evaluate_model
    from factedge.train.lora import add_lora
    from factedge.train.model import load_for_training

    out = {}
    for name, adapter in policies.items():
        model = load_for_training(recipe / "LLaVA-RLHF-shapes" / "sft_model")
        if adapter is not None:
            add_lora(model, init_from=adapter, name="policy", trainable=False)
        out[name] = evaluate_model(model, recipe / "world" / "heldout", limit=limit, max_new_tokens=max_new_tokens,
                                   batch=64, examples=3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--scale", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path(".cache/oracle_ceiling"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--override", action="append", default=[], help="PPO config key=value for the oracle run")
    ap.add_argument("--only-new", action="store_true", help="evaluate only the new oracle policy")
    args = ap.parse_args(argv)
    ensure_factedge()
    from factedge.train.recipe import recipe_preset

    tag = "-".join(o.replace("=", "_") for o in args.override) or "default"
    policy, seconds = train_oracle_policy(args.recipe, args.scale, args.seed,
                                          args.work / f"ppo-oracle-{args.seed}-{tag}", args.override)
    policies = {} if args.only_new else {
        "SFT": None, "PPO + fact RM": args.recipe / "LLaVA-RLHF-shapes" / "rlhf_lora_adapter_model"}
    source = next((o.split("=", 1)[1] for o in args.override if o.startswith("reward.source=")), "oracle")
    policies[f"PPO + {'fact RM' if source == 'rm' else 'oracle'} ({tag})"] = policy
    res = evaluate(args.recipe, policies, args.limit, recipe_preset(args.scale, args.seed).ppo.rollout.max_new_tokens)
    print(f"oracle PPO trained in {seconds:.0f} s; held-out {next(iter(res.values())).get('n', '?')} answers\n")
    print_figures(res, ROWS)
    if args.json:
        from factedge.edge.atomic import write_json

        write_json(args.json, {"recipe": str(args.recipe), "seed": args.seed, "oracle_ppo_s": seconds, "eval": res},
                   default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
