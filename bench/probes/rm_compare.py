"""Fact RM vs plain RM on the SFT models of finished recipes, with the current world's preference pairs.

Why: the RM comparison is the part of the recipe that the pair data decides, and retraining SFT for
every change of the pairs costs ~5 minutes a seed. A recipe's SFT model is reused only if the current
world code writes byte-identical SFT data for that recipe's seed and config (checked; otherwise the
script stops). Then, per recipe: the fact-augmented RM and the plain RM are trained with the recipe's
own RM settings on the same pairs, and both are scored on the held-out pairs. Accuracy is split by
which side is longer (worse longer / worse shorter / same length), because a length shortcut gives the
plain and the fact RM the same score without reading anything. `--likelihood` adds a row with no RM:
the SFT model's own log-likelihood of each side given the image (and given another held-out image),
which shows whether the information a plain RM would need is in the model at all.

    python -m bench.probes.rm_compare RECIPE_DIR [RECIPE_DIR ...] --json out/rm_compare.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

from bench.common import ensure_factedge

GAPS = ("worse_longer", "worse_shorter", "same_length")


def _gap(item: dict) -> str:
    words = [len(item[k]["value"].split()) for k in ("output_1", "output_2")]
    worse_minus_better = words[1] - words[0] if item["preference"] == 1 else words[0] - words[1]
    return GAPS[0] if worse_minus_better > 0 else GAPS[1] if worse_minus_better < 0 else GAPS[2]


def split_accuracy(rm_dir: Path, sft: Path, world, rm_cfg, facts: dict | None) -> dict:
    """Held-out pairwise accuracy overall and per length gap, scored as the recipe's own evaluation
    does (rm.heldout_rewards: the same fact shuffles, so "accuracy" equals the recipe's figure)."""
    from factedge.train.config import ModelConfig
    from factedge.train.model import load_from_config
    from factedge.train.rm.model import RewardModel
    from factedge.train.rm.trainer import PairScorer, heldout_rewards, load_pairs

    cfg = dataclasses.replace(rm_cfg, use_facts=facts is not None, model=ModelConfig(base=str(sft), dtype="float32"))
    model = load_from_config(cfg.model)
    model.requires_grad_(False)
    pairs = load_pairs(world.heldout.preference, cfg, facts)
    r1, r2 = heldout_rewards(PairScorer(RewardModel.load(model, rm_dir), cfg), pairs, cfg.run.seed)
    hits: dict[str, list[bool]] = {g: [] for g in GAPS}
    for p, a, b in zip(pairs, r1.tolist(), r2.tolist()):
        hits[_gap(p.item)].append((b - a >= 0) == (p.item["preference"] == 2))
    return _summary(hits)


def likelihood_accuracy(sft: Path, world) -> dict[str, dict]:
    """Pairs ranked by the SFT model's summed log-likelihood of each response, given the pair's image
    ("sft_likelihood") and given another held-out image ("sft_likelihood_other_image")."""
    import torch

    from factedge.train.config import ModelConfig
    from factedge.train.conversation import encode_conversation
    from factedge.train.model import load_from_config

    model = load_from_config(ModelConfig(base=str(sft), dtype="float32"))
    model.requires_grad_(False)
    model.train(False)
    items = json.loads(world.heldout.preference.read_text())
    images = sorted({x["image"] for x in items})
    rng = random.Random(0)

    def loglik(item: dict, response: str, image: str) -> float:
        one = dict(item, conversations=[item["conversations"][0], {"from": "gpt", "value": response}])
        ids, labels = encode_conversation(one, model.tokenizer, fmt=model.chat_format)
        loss, n = model.lm_loss(model.splice([ids], model.embed_images([world.heldout.images / image]), labels=[labels]))
        return -float(loss) * n

    hits = {name: {g: [] for g in GAPS} for name in ("sft_likelihood", "sft_likelihood_other_image")}
    with torch.no_grad():
        for x in items:
            other = rng.choice([i for i in images if i != x["image"]])
            for name, image in zip(hits, (x["image"], other)):
                l1, l2 = (loglik(x, x[k]["value"], image) for k in ("output_1", "output_2"))
                hits[name][_gap(x)].append((l2 > l1) == (x["preference"] == 2))
    return {name: _summary(h) for name, h in hits.items()}


def _summary(hits: dict[str, list[bool]]) -> dict:
    every = [h for g in GAPS for h in hits[g]]
    out = {"accuracy": sum(every) / len(every), "n": len(every)}
    for g in GAPS:
        out[g] = sum(hits[g]) / len(hits[g]) if hits[g] else float("nan")
        out[g + "_n"] = len(hits[g])
    return out


def compare(recipe: Path, work: Path, threads: int, likelihood: bool, reuse: bool) -> dict:
    import torch

    from factedge.train.recipe import ROOT_NAME, recipe_preset, train_rm_stage
    from factedge.train.rm.model import RM_DIR
    from factedge.train.world.export import write_world
    from factedge.train.world.scene import WorldConfig

    if threads:
        torch.set_num_threads(threads)
    meta = json.loads((recipe / "recipe.json").read_text())
    cfg = recipe_preset(meta["config"]["scale"], meta["config"]["seed"], meta["config"]["base"].get("lm", "llama"))
    world_cfg = dataclasses.replace(cfg.world, **{k: v for k, v in meta["config"]["world"].items()
                                                  if k in {f.name for f in dataclasses.fields(WorldConfig)}})
    cfg = dataclasses.replace(cfg, world=world_cfg, n_images=meta["config"]["n_images"])
    work.mkdir(parents=True, exist_ok=True)
    world = write_world(work / "world", cfg.n_images, cfg.seed, cfg.world)
    if world.sft.read_bytes() != (recipe / "world" / "sft.json").read_bytes():
        raise SystemExit(f"{recipe}: the current world writes different SFT data; run the recipe again instead")
    sft = recipe / ROOT_NAME / "sft_model"
    facts = json.loads(world.captions.read_text()) | json.loads(world.heldout.captions.read_text())
    row = {"recipe": str(recipe), "seed": cfg.seed, "pairs": world.counts["preference"]}
    for name, use_facts in (("fact", True), ("plain", False)):
        out = work / "runs" / f"rm_{name}" / RM_DIR
        if not (reuse and out.is_dir()):
            out = train_rm_stage(cfg, world, sft, work, f"rm_{name}", use_facts, None)
        row[name] = split_accuracy(out, sft, world, cfg.rm, facts if use_facts else None)
        print(json.dumps({"seed": cfg.seed, name: row[name]}), flush=True)
    if likelihood:
        row |= likelihood_accuracy(sft, world)
        print(json.dumps({"seed": cfg.seed, **{k: row[k] for k in ("sft_likelihood", "sft_likelihood_other_image")}}),
              flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipes", nargs="+", type=Path)
    ap.add_argument("--work", type=Path, default=Path(".cache/bench/rm_compare"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--likelihood", action="store_true", help="also rank pairs by the SFT model's likelihood")
    ap.add_argument("--reuse", action="store_true", help="keep RMs already trained under --work (same world code only)")
    args = ap.parse_args()
    ensure_factedge()
    rows = [compare(r, args.work / r.name, args.threads, args.likelihood, args.reuse) for r in args.recipes]
    print("\n| seed | pairs | RM | held-out accuracy | worse longer | worse shorter | same length |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        for name in ("fact", "plain", "sft_likelihood", "sft_likelihood_other_image"):
            if name not in row:
                continue
            r = row[name]
            print(f"| {row['seed']} | {row['pairs']} | {name} | {r['accuracy']:.3f} | {r['worse_longer']:.3f} "
                  f"({r['worse_longer_n']}) | {r['worse_shorter']:.3f} ({r['worse_shorter_n']}) | "
                  f"{r['same_length']:.3f} ({r['same_length_n']}) |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
