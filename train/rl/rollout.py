"""Rollouts: sample responses with the policy adapter, score them, and log them.

A `Rollout` holds, for a batch of prompts: the response tokens and text, whether each stopped at
EOS, per-token log-probs under the policy and the reference, the values (PPO only), the per-token
KL and the terminal reward term by term (RM score on the fact-augmented reward prompt, −8 without
EOS, the length term, 2·correctness). Generation and scoring run in micro-batches; everything is
computed without gradients (the optimiser recomputes what it differentiates).

The reward input is re-tokenised from the response *text* through `reward_prompt` (what the reward
model saw in training); the reference code splices the generated ids instead, the same text up to
SentencePiece's choice of segmentation.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from factedge.edge.errors import OutputError
from factedge.train.rl.actor_critic import POLICY, REFERENCE, ActorCritic
from factedge.train.conversation import encode_prompt
from factedge.train.rm.prompt import encode_reward_input
from factedge.train.rl.config import RLBase
from factedge.train.rl.data import PromptItem
from factedge.train.rl.maths import RewardParts, correctness, terminal_reward, token_kl
from factedge.train.rl.oracle import oracle_scores
from factedge.train.rl.generate import sample


@dataclass
class Rollout:
    """One RL step's samples. Tensors are [B] or [B, R] (R = longest response, right-padded)."""

    items: list[PromptItem]
    prompt_ids: list[list[int]]
    responses: list[list[int]]
    texts: list[str]
    has_eos: Tensor  # [B] bool
    mask: Tensor  # [B, R] 1 = response token (EOS included)
    logprobs: Tensor
    ref_logprobs: Tensor
    entropy: Tensor
    values: Tensor | None
    kl: Tensor  # [B, R] per-token KL estimate (masked)
    parts: RewardParts  # [B] terminal reward terms
    correct: Tensor  # [B] correctness before its ×2

    def __len__(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(1)

    def select(self, idx: Sequence[int]) -> "Rollout":
        """The samples `idx`, response columns cut to their longest response."""
        ix = torch.as_tensor(list(idx), dtype=torch.long)
        width = max(1, int(self.mask[ix].sum(1).max()))
        pick = lambda t: None if t is None else (t[ix][:, :width] if t.dim() == 2 else t[ix])  # noqa: E731
        lists = {f: [getattr(self, f)[i] for i in idx] for f in ("items", "prompt_ids", "responses", "texts")}
        tensors = {f.name: pick(getattr(self, f.name)) for f in fields(self)
                   if f.name not in lists and f.name != "parts"}
        parts = RewardParts(**{f.name: getattr(self.parts, f.name)[ix] for f in fields(RewardParts)})
        return replace(self, **lists, **tensors, parts=parts)


def _pad_cat(chunks: list[Tensor], width: int) -> Tensor:
    return torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1])) for c in chunks])


def encode_prompts(ac: ActorCritic, items: Sequence[PromptItem]) -> list[list[int]]:
    return [encode_prompt(it.question, ac.model.tokenizer, fmt=ac.model.chat_format) for it in items]


def prompt_fits(ac: ActorCritic, item: PromptItem, max_prompt_tokens: int) -> bool:
    """Whether the prompt's ids (the image placeholder counted once, as the reference's query_len
    filter) fit `max_prompt_tokens`."""
    return len(encode_prompt(item.question, ac.model.tokenizer, fmt=ac.model.chat_format)) <= max_prompt_tokens


def reward_inputs(ac: ActorCritic, items: Sequence[PromptItem], texts: Sequence[str], *, use_facts: bool,
                  seed: int, step: int) -> list[list[int]]:
    """Reward-model inputs; facts shuffled per example by an rng seeded with (seed, step, sample)."""
    out = []
    for n, (it, text) in enumerate(zip(items, texts)):
        facts = it.facts if use_facts else None
        rng = random.Random(f"{seed}:{step}:{n}")
        item = {"id": it.id, "image": str(it.image), "conversations": [{"from": "human", "value": it.question}]}
        out.append(encode_reward_input(item, text, ac.model.tokenizer, facts, rng, ac.model.chat_format, ac.reward.form))
    return out


@torch.no_grad()
def collect(ac: ActorCritic, items: Sequence[PromptItem], cfg: RLBase, *, with_values: bool, step: int,
            generator: torch.Generator | None = None) -> Rollout:
    """Sample and score one response per item (items repeat for group methods)."""
    tok = ac.model.tokenizer
    r = cfg.rollout
    ac.train(False)
    prompt_ids = encode_prompts(ac, items)
    cols: dict[str, list] = {k: [] for k in ("resp", "text", "eos", "lp", "ref", "ent", "val", "score")}
    for start in range(0, len(items), r.micro_batch_size):
        chunk = list(range(start, min(start + r.micro_batch_size, len(items))))
        ids = [prompt_ids[i] for i in chunk]
        embeds = ac.image_embeds([items[i].image for i in chunk])
        ac.use(POLICY)
        s = sample(ac.model, ids, embeds, max_new_tokens=r.max_new_tokens, eos_id=tok.eos_token_id,
                   pad_id=tok.pad_token_id, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                   generator=generator)
        batch = ac.response_batch(ids, s.tokens, embeds)
        lp, ent = ac.logprobs(batch, POLICY, r.temperature, with_entropy=True)
        ref, _ = ac.logprobs(batch, REFERENCE, r.temperature)
        cols["resp"] += s.tokens
        cols["eos"] += s.has_eos
        cols["lp"].append(lp)
        cols["ref"].append(ref)
        cols["ent"].append(ent)
        if with_values:
            cols["val"].append(ac.values(batch))
        texts = [tok.decode(t, skip_special_tokens=True).strip() for t in s.tokens]
        cols["text"] += texts
        if cfg.reward.source == "oracle":  # the ceiling: the scene's truth instead of the RM (rl/oracle.py)
            cols["score"].append(oracle_scores([items[i] for i in chunk], texts, cfg.reward.scenes,
                                               cfg.reward.oracle_score, cfg.reward.oracle_false_weight))
            continue
        rm_ids = reward_inputs(ac, [items[i] for i in chunk], texts, use_facts=cfg.reward.use_facts,
                               seed=cfg.run.seed, step=step)
        cols["score"].append(ac.rewards(rm_ids, [items[i].image for i in chunk]))
    return _assemble(items, prompt_ids, cols, cfg)


def _assemble(items: Sequence[PromptItem], prompt_ids: list[list[int]], cols: dict, cfg: RLBase) -> Rollout:
    width = max(len(t) for t in cols["resp"])
    mask = torch.zeros(len(items), width)
    for b, t in enumerate(cols["resp"]):
        mask[b, :len(t)] = 1.0
    lp, ref = _pad_cat(cols["lp"], width).cpu(), _pad_cat(cols["ref"], width).cpu()
    texts = cols["text"]
    correct = torch.tensor([correctness(x, it.qtype, it.answer) for x, it in zip(texts, items)])
    has_eos = torch.tensor(cols["eos"], dtype=torch.bool)
    rw = cfg.reward
    parts = terminal_reward(
        torch.cat(cols["score"]).float().cpu(), has_eos, mask.sum(1), correct,
        max_new_tokens=cfg.rollout.max_new_tokens,
        length_multiplier=torch.tensor([it.length_bonus for it in items]),
        penalty_no_eos=rw.penalty_no_eos, length_score=rw.length_score, correct_score=rw.correct_score,
        bias=rw.bias)
    return Rollout(
        items=list(items), prompt_ids=prompt_ids, responses=cols["resp"], texts=texts, has_eos=has_eos, mask=mask,
        logprobs=lp, ref_logprobs=ref, entropy=_pad_cat(cols["ent"], width).cpu(),
        values=_pad_cat(cols["val"], width).cpu() if cols["val"] else None,
        kl=token_kl(lp, ref, mask, rw.kl_estimator), parts=parts, correct=correct)


def rollout_stats(ro: Rollout) -> dict[str, float]:
    """Batch means for metrics.jsonl (the reference's objective/* figures)."""
    mean = lambda t: float(t.float().mean())  # noqa: E731
    return {
        "reward": mean(ro.parts.total), "rm_score": mean(ro.parts.score), "stop_penalty": mean(ro.parts.stop_penalty),
        "length_term": mean(ro.parts.length), "correct_term": mean(ro.parts.correctness),
        "kl_sum_seq": mean(ro.kl.sum(1)), "response_len": mean(ro.lengths), "eos_rate": mean(ro.has_eos),
        "entropy": float((ro.entropy * ro.mask).sum() / ro.mask.sum().clamp(min=1)),
    }


def log_rollout(path: Path, ro: Rollout, step: int) -> Path:
    """rollouts/step-N.jsonl: one line per sample (prompt, response, reward parts, KL); atomic."""
    lines = []
    for b, it in enumerate(ro.items):
        lines.append(json.dumps({
            "step": step, "id": it.id, "image": it.image.name, "type": it.qtype, "answer": it.answer,
            "prompt": it.question, "response": ro.texts[b], "tokens": int(ro.lengths[b]),
            "has_eos": bool(ro.has_eos[b]),
            "reward": {"total": float(ro.parts.total[b]), "rm_score": float(ro.parts.score[b]),
                       "stop_penalty": float(ro.parts.stop_penalty[b]), "length": float(ro.parts.length[b]),
                       "correctness": float(ro.parts.correctness[b])},
            "kl": float(ro.kl[b].sum()),
        }, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write the rollout log: {exc}", path) from exc
    return path
