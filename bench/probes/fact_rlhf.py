"""The effect of Fact-RLHF, measured (issue #4): does SFT -> Fact-RM -> PPO hallucinate less than SFT?

Per seed: `train.recipe.run_recipe` (world, base, full-FT SFT, fact-augmented RM, PPO policy LoRA) plus
a reward model trained WITHOUT facts on the same pairs and budget; then, on the held-out images (never
seen in training), greedy answers of the SFT model and of the RLHF policy (the LoRA applied unmerged
through PEFT on the SFT model, as LLaVA-RLHF runs it), judged by the world's programmatic judge:
hallucination rate (overall and on describe prompts), mean MMHal-style score, yes/no and multiple-choice
accuracy; the RMs' held-out pairwise accuracy (facts vs plain); training throughput per stage.

    python -m bench.probes.fact_rlhf --scale cpu --seeds 0,1 --json out/fact_rlhf_cpu.json
    python -m bench.probes.fact_rlhf --scale gpu --seeds 0,1 --json out/fact_rlhf_gpu.json   # one H100, ~5 min
    python -m bench.probes.fact_rlhf --lm smollm2 --scale cpu --seeds 0     # the recipe on SmolLM2-135M

Needs torch, transformers, peft, accelerate, safetensors, sentencepiece, pillow; not gguf / trl /
llama_cpp, given a LLaMA tokenizer source: env FACTEDGE_SPM_VOCAB naming llama.cpp's
ggml-vocab-llama-spm.gguf (read with gguf) or a serialised `tokenizer.model` (read as is).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from bench.common import ROOT, ensure_factedge


def evaluate_root(root: Path, split: Path, limit: int, max_new_tokens: int) -> dict:
    """SFT vs RLHF policy on the held-out split (one model load; the policy LoRA added on top)."""
    import torch

    from factedge.train.heldout_eval import evaluate_model
    from factedge.train.lora import add_lora
    from factedge.train.model import load_for_training

    model = load_for_training(root)
    if torch.cuda.is_available():
        model.to("cuda")
    out = {}
    for name in ("sft", "rlhf"):
        if name == "rlhf":
            add_lora(model, init_from=root / "rlhf_lora_adapter_model", name="policy", trainable=False)
        t0 = time.perf_counter()
        out[name] = evaluate_model(model, split, limit=limit, max_new_tokens=max_new_tokens, batch=64, examples=4)
        out[name]["eval_s"] = time.perf_counter() - t0
    return out


def run_seed(scale: str, seed: int, cache: Path, limit: int, log, lm: str = "llama") -> dict:
    from factedge.train.recipe import recipe_preset, run_recipe

    cfg = recipe_preset(scale, seed, lm)
    cfg.plain_rm = True
    t0 = time.perf_counter()
    res = run_recipe(cfg, cache, log=log)
    recipe_s = time.perf_counter() - t0
    ev = evaluate_root(res.root, res.world.heldout.root, limit, cfg.ppo.rollout.max_new_tokens)
    m = res.metrics
    return {"seed": seed, "cached": res.cached, "recipe_s": recipe_s, "root": str(res.root),
            "eval": ev, "rm_accuracy_facts": m["rm"].get("eval_accuracy"),
            "rm_accuracy_plain": m.get("rm_plain", {}).get("eval_accuracy"),
            "rm_same_length_facts": m["rm"].get("eval_accuracy_same_length"),
            "rm_same_length_plain": m.get("rm_plain", {}).get("eval_accuracy_same_length"),
            "throughput": {"sft_samples_per_s": m["sft"]["samples_per_s"], "sft_tokens_per_s": m["sft"]["tokens_per_s"],
                           "ppo_samples_per_s": m["ppo"]["samples_per_s"],
                           "ppo_rollout_tokens_per_s": m["ppo"]["rollout_tokens_per_s"]},
            "timings": m["timings"], "device": m["device"],
            "ppo_last": {k: v for k, v in (m["ppo"]["steps"][-1] if m["ppo"]["steps"] else {}).items()
                         if isinstance(v, (int, float))}}


ROWS = [("hallucination rate (all)", "hallucination_rate"), ("hallucination rate (describe)",
        "describe_hallucination_rate"), ("mean judge score 0-6", "mean_score"), ("yes/no accuracy", "yes_no_accuracy"),
        ("multiple-choice accuracy", "multiple_choice_accuracy"), ("mean answer tokens", "mean_tokens"),
        ("false claims per answer", "false_claims"), ("true claims per answer", "true_claims"),
        ("claim precision", "claim_precision"), ("describe: objects covered", "describe_coverage"),
        ("describe: false claims per answer", "describe_false_claims")]


def summarise(results: list[dict]) -> dict:
    def agg(xs):
        xs = [x for x in xs if x is not None]
        return {"mean": statistics.fmean(xs) if xs else None, "per_seed": xs}

    out = {}
    for _, key in ROWS:
        for model in ("sft", "rlhf"):
            out[f"{model}.{key}"] = agg([r["eval"][model].get(key) for r in results])
    out["rm_accuracy_facts"] = agg([r["rm_accuracy_facts"] for r in results])
    for key in ("rm_accuracy_plain", "rm_same_length_facts", "rm_same_length_plain"):
        out[key] = agg([r.get(key) for r in results])
    for k in results[0]["throughput"]:
        out[k] = agg([r["throughput"][k] for r in results])
    return out


def print_table(summary: dict, n_seeds: int) -> None:
    def f(v):
        return "-" if v is None else f"{v:.3f}"

    print(f"\nFact-RLHF on held-out shapes images ({n_seeds} seed(s); per-seed values in brackets)")
    print(f"{'metric':34} {'SFT':>28} {'SFT+Fact-RLHF':>28}")
    for label, key in ROWS:
        a, b = summary[f"sft.{key}"], summary[f"rlhf.{key}"]
        cell = lambda s: f"{f(s['mean'])} [{', '.join(f(x) for x in s['per_seed'])}]"  # noqa: E731
        print(f"{label:34} {cell(a):>28} {cell(b):>28}")
    for label, key in (("RM held-out pair acc. (facts)", "rm_accuracy_facts"),
                       ("RM held-out pair acc. (plain)", "rm_accuracy_plain"),
                       ("RM equal-length pairs (facts)", "rm_same_length_facts"),
                       ("RM equal-length pairs (plain)", "rm_same_length_plain"),
                       ("SFT samples/s", "sft_samples_per_s"), ("SFT tokens/s", "sft_tokens_per_s"),
                       ("PPO samples/s", "ppo_samples_per_s"), ("PPO rollout tokens/s", "ppo_rollout_tokens_per_s")):
        s = summary[key]
        print(f"{label:34} {f(s['mean']):>28} [{', '.join(f(x) for x in s['per_seed'])}]")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", choices=("micro", "cpu", "gpu"), default="cpu")
    ap.add_argument("--lm", choices=("llama", "smollm2"), default="llama",
                    help="the tiny LLaMA trained from scratch, or SmolLM2-135M-Instruct (recipe_smol.py)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "recipe")
    ap.add_argument("--limit", type=int, default=0, help="held-out prompts to judge (0: all)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--vocab", type=Path, default=None,
                    help="LLaMA vocab: llama.cpp's vocab GGUF or a tokenizer.model (default: env FACTEDGE_SPM_VOCAB, "
                         "else .cache/tokenizer.model when present, else the native build's GGUF)")
    args = ap.parse_args(argv)
    carried = ROOT / ".cache" / "tokenizer.model"
    if args.vocab is not None:
        os.environ["FACTEDGE_SPM_VOCAB"] = str(args.vocab.resolve())
    elif not os.environ.get("FACTEDGE_SPM_VOCAB") and carried.is_file():
        os.environ["FACTEDGE_SPM_VOCAB"] = str(carried)
    ensure_factedge()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)  # noqa: E731
    results = []
    for seed in seeds:
        log(f"seed {seed}: recipe ({args.scale})")
        results.append(run_seed(args.scale, seed, args.cache, args.limit, log, args.lm))
        log(f"seed {seed}: done")
    summary = summarise(results)
    print_table(summary, len(seeds))
    report = {"scale": args.scale, "lm": args.lm, "seeds": seeds, "summary": summary, "runs": results,
              "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if args.json:
        from factedge.edge.atomic import write_json

        write_json(args.json, report, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
