"""Train the (fact-augmented) reward model on preference pairs (stage 4 of Fact-RLHF).

Data: LLaVA-Human-Preference-10K format (`conversations`, `output_1`, `output_2`, `preference`
1|2 = which output is better, i.e. less hallucinated). Each output is scored in the reward prompt
(reward_prompt.py) with the image's facts (`image_to_caption.json`, keyed by the item's `image`)
shuffled per example and visit, or without facts when `use_facts` is off. Loss per pair, as
LLaVA-RLHF: Bradley-Terry `BCE(r2 - r1, preference == 2)` averaged over the batch, plus
`centering_coef * |mean(r1 + r2)|` so rewards stay near 0 (PPO adds them to KL and length terms).
Held-out pairwise accuracy (r2 - r1 >= 0 predicts "2 is better", as LLaVA-RLHF's metric) is
measured every `eval_every` steps and at the end on `eval_data` or a seeded split of `eval_size`
pairs. Output: `<run>/rm_lora_adapter_model/` (PEFT folder + reward_head.safetensors).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from factedge.edge.errors import ConfigError, InputError
from factedge.train.rm.config import RMConfig
from factedge.train.conversation import truncate
from factedge.train.data import image_folder, image_path, read_facts, read_items
from factedge.train.loop import Progress, fit, make_accelerator, prepare_fit
from factedge.train.model import IGNORE_INDEX, LlavaForTraining, load_from_config
from factedge.train.rm.model import RM_DIR, RewardModel
from factedge.train.rm.prompt import encode_reward_input, reward_form
from factedge.train.run_dir import RunDir, RunResult, seed_everything


def pairwise_loss(r1: torch.Tensor, r2: torch.Tensor, preference: torch.Tensor,
                  centering_coef: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy) for rewards of output_1 / output_2 and `preference` in {1, 2}.

    loss = mean BCE-with-logits(r2 - r1, preference == 2) + coef * |mean(r1 + r2)|;
    accuracy = share of pairs where (r2 - r1 >= 0) == (preference == 2)."""
    choice = (preference == 2).to(r1.dtype)
    logits = r2 - r1
    bt = F.binary_cross_entropy_with_logits(logits, choice, reduction="mean")
    loss = bt + centering_coef * (r1 + r2).mean().abs()
    accuracy = ((logits >= 0).to(r1.dtype) == choice).to(r1.dtype).mean()
    return loss, accuracy


@dataclass
class Pair:
    item: dict[str, Any]
    image: Path | None
    facts: list[str] | None


def load_pairs(path: str | Path, cfg: RMConfig, facts: dict[str, list[str]] | None) -> list[Pair]:
    items = read_items(path, required=("conversations", "output_1", "output_2", "preference"))
    folder = image_folder(path, cfg.image_folder)
    pairs = []
    for n, item in enumerate(items):
        if item["preference"] not in (1, 2):
            raise InputError(f"item {n} ({item.get('id', '?')}): preference must be 1 or 2", path)
        name = item.get("image")
        image = image_path(folder, str(name), path) if name else None
        item_facts = None
        if facts is not None:
            if not name or str(name) not in facts:
                raise InputError(f"item {n} ({item.get('id', '?')}): no facts for image {name!r}", cfg.facts)
            item_facts = facts[str(name)]
        pairs.append(Pair(item, image, item_facts))
    return pairs


def split_pairs(pairs: list[Pair], cfg: RMConfig) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out): `eval_data`'s pairs, or `eval_size` pairs drawn with the run's seed."""
    if cfg.eval_size <= 0 and cfg.eval_data is None:
        return pairs, []
    if cfg.eval_size >= len(pairs):
        raise ConfigError(f"eval_size {cfg.eval_size} leaves no training pairs out of {len(pairs)}")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.run.seed)).tolist()
    held = set(order[:cfg.eval_size])
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in sorted(held)]


class PairScorer:
    """Encodes a pair's two reward inputs (facts shuffled by a per-(visit, pair) seeded rng) and
    scores them in one batch."""

    def __init__(self, rm: RewardModel, cfg: RMConfig):
        self.rm, self.cfg = rm, cfg
        self.model: LlavaForTraining = rm.model

    def encode(self, pair: Pair, rng: random.Random) -> list[list[int]]:
        out = []
        for key in ("output_1", "output_2"):
            response = str(pair.item[key]["value"] if isinstance(pair.item[key], dict) else pair.item[key])
            facts = pair.facts if self.cfg.use_facts else None
            ids = encode_reward_input(pair.item, response, self.model.tokenizer, facts, rng, self.model.chat_format,
                                      self.rm.form)
            ids, _ = truncate(ids, [IGNORE_INDEX] * len(ids), self.cfg.max_length, self.model.tokens_per_image)
            out.append(ids)
        return out

    def rewards(self, module, pairs: Sequence[Pair], seeds: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(r1 [P], r2 [P], positions processed) through `module` (the RewardModel, maybe wrapped)."""
        ids: list[list[int]] = []
        for pair, seed in zip(pairs, seeds):
            ids += self.encode(pair, random.Random(seed))
        images = [p.image for p in pairs for _ in range(2)]
        shown = [img for img in images if img is not None]
        embeds = iter(self.model.embed_images(shown)) if shown else iter(())
        per_sample = [next(embeds) if img is not None else None for img in images]
        spliced = self.model.splice(ids, per_sample, padding_side="left")
        r = module(spliced, [len(x) for x in ids])
        return r[0::2], r[1::2], spliced.n_tokens


def _preference(pairs: Sequence[Pair], device) -> torch.Tensor:
    return torch.tensor([int(p.item["preference"]) for p in pairs], device=device)


@torch.no_grad()
def heldout_rewards(scorer: PairScorer, pairs: Sequence[Pair], seed: int, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(r1, r2) per held-out pair, in eval mode, facts shuffled with a fixed per-(seed, pair) rng."""
    scorer.rm.eval()
    r1s, r2s = [], []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        r1, r2, _ = scorer.rewards(scorer.rm, chunk, [f"{seed}:eval:{i + k}" for k in range(len(chunk))])
        r1s.append(r1)
        r2s.append(r2)
    return torch.cat(r1s), torch.cat(r2s)


def _word_counts(pair: Pair) -> tuple[int, int]:
    return tuple(len(str(v["value"] if isinstance(v, dict) else v).split())  # type: ignore[return-value]
                 for v in (pair.item["output_1"], pair.item["output_2"]))


def evaluate_pairs(scorer: PairScorer, pairs: Sequence[Pair], seed: int, batch: int = 8) -> dict[str, float]:
    """Held-out pairwise accuracy, BT loss and mean reward (facts shuffled with a fixed seed), and the
    accuracy on the pairs whose outputs have the same number of words, where preferring the shorter
    (or longer) answer scores 50%: the figure that shows whether the RM reads."""
    if not pairs:
        return {}
    r1, r2 = heldout_rewards(scorer, pairs, seed, batch)
    pref = _preference(pairs, r1.device)
    loss, acc = pairwise_loss(r1, r2, pref, scorer.cfg.centering_coef)
    out = {"eval_accuracy": float(acc), "eval_loss": float(loss), "eval_reward_mean": float((r1 + r2).mean() / 2)}
    same = torch.tensor([a == b for a, b in map(_word_counts, pairs)], device=r1.device)
    if bool(same.any()):
        hits = ((r2 - r1 >= 0) == (pref == 2))[same]
        out |= {"eval_accuracy_same_length": float(hits.float().mean()), "eval_same_length_pairs": int(same.sum())}
    return out


def train_rm(cfg: RMConfig, progress: Progress | None = None) -> RunResult:
    """Train the reward model as configured; output `<run>/rm_lora_adapter_model/`."""
    if cfg.use_facts and not cfg.facts:
        raise ConfigError("use_facts needs `facts` (image_to_caption.json)")
    reward_form(cfg.prompt_form)  # an unknown form fails here, before the model loads
    accel = make_accelerator(cfg.run)
    run = RunDir(cfg.run.out, main=accel.is_main_process, keep=cfg.run.keep_checkpoints)
    seed_everything(cfg.run.seed)
    model = load_from_config(cfg.model)
    model.requires_grad_(False)
    rm = RewardModel.create(model, cfg.lora, form=cfg.prompt_form, reading=cfg.reading_head)
    facts = read_facts(cfg.facts) if cfg.use_facts else None
    pairs = load_pairs(cfg.data, cfg, facts)
    if cfg.eval_data is not None:
        train, held = pairs, load_pairs(cfg.eval_data, cfg, facts)
    else:
        train, held = split_pairs(pairs, cfg)
    trainables = {n: p for n, p in rm.named_parameters() if p.requires_grad}
    f, start = prepare_fit(accel, run, rm, cfg.optim, cfg.run, len(train), cfg, trainables=trainables,
                           params=trainables.values())
    scorer = PairScorer(f.raw, cfg)
    world = accel.num_processes

    def loss_fn(micro: list[int], batch: list[int], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        chunk = [train[i] for i in micro]
        epoch = step // f.plan.steps_per_epoch  # facts are reshuffled on every visit of a pair
        r1, r2, tokens = scorer.rewards(f.model, chunk, [f"{cfg.run.seed}:{epoch}:{i}" for i in micro])
        loss, acc = pairwise_loss(r1, r2, _preference(chunk, r1.device), cfg.centering_coef)
        share = len(micro) * world / len(batch)  # this micro-batch's weight in the global mean
        return loss * share, {"accuracy": float(acc) * len(micro) / len(batch), "tokens": tokens,
                              "reward_mean": float((r1 + r2).detach().mean() / 2) * len(micro) / len(batch)}

    evaluate = (lambda: evaluate_pairs(scorer, held, cfg.run.seed)) if held else None
    metrics = fit(f, start, loss_fn, progress=progress, evaluate=evaluate, eval_every=cfg.eval_every)
    output = rm_output(f.raw, run.path, cfg) if accel.is_main_process else None
    return RunResult(run.path, output, f.plan.total_steps, metrics)


def rm_output(rm: RewardModel, run_path: Path, cfg: RMConfig) -> Path:
    return rm.save(run_path / RM_DIR, base=Path(cfg.model.base).resolve())
