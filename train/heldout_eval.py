"""Greedy answers of a trained model on a world's held-out split, scored by the world's judge.

Why not `evaluate.backends.TorchBackend`: that answers one question at a time through the converter's
reference model; the recipe and its benchmark need hundreds of answers per model in seconds, so this
batches greedy decoding through the training model's own sampler (top-k 1 = argmax), with whatever
adapter is active (the SFT model, or the RLHF policy LoRA unmerged, as LLaVA-RLHF runs it).

Items: the held-out `ppo_prompts.json` (describe / yes-no / multiple-choice / open questions with
their truths) against `scenes.json`. Figures: hallucination rate and mean MMHal-style score overall
and per type, yes/no and multiple-choice accuracy, mean answer length.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch

from factedge.train.conversation import encode_prompt
from factedge.train.rl.generate import sample
from factedge.train.world.export import read_scenes
from factedge.train.world.answers import judge_choice, judge_yes_no
from factedge.train.world.judge import judge


def heldout_items(split_root: str | Path, limit: int = 0) -> list[dict]:
    """The held-out PPO prompts (each with `type`, `answer`, `image`), first `limit` (0: all)."""
    items = json.loads((Path(split_root) / "ppo_prompts.json").read_text())
    return items[:limit] if limit > 0 else items


def question_of(item: dict) -> str:
    return str(item["conversations"][0]["value"]).replace("<image>", "").strip()


@torch.no_grad()
def greedy_answers(model, items: Sequence[dict], image_dir: Path, *, max_new_tokens: int = 64,
                   batch: int = 32) -> list[tuple[str, int, bool]]:
    """(text, n tokens, ended with EOS) per item, greedy, `batch` prompts at a time."""
    tok = model.tokenizer
    eos = tok.eos_token_id
    was_training = model.training
    model.train(False)
    out = []
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        ids = [encode_prompt(str(it["conversations"][0]["value"]), tok, fmt=model.chat_format) for it in chunk]
        embeds = model.embed_images([image_dir / it["image"] for it in chunk])
        got = sample(model, ids, embeds, max_new_tokens=max_new_tokens, eos_id=eos, pad_id=tok.pad_token_id, top_k=1)
        for toks, has_eos in zip(got.tokens, got.has_eos):
            body = toks[:-1] if has_eos else toks
            out.append((tok.decode(body, skip_special_tokens=True).strip(), len(toks), has_eos))
    model.train(was_training)
    return out


def score_answers(split_root: str | Path, items: Sequence[dict], answers: Sequence[tuple[str, int, bool]]) -> dict:
    """Judge every answer; aggregate per type and overall. Besides the MMHal-style rate (share of answers
    with any false claim), claim-level figures show whether fewer hallucinations come from truer answers
    or from saying less: false and true claims per answer, claim precision, and for descriptions the
    share of the scene's objects that true claims identify (coverage)."""
    scenes = read_scenes(Path(split_root) / "scenes.json")
    per: dict[str, list] = defaultdict(list)
    correct: dict[str, list[bool]] = defaultdict(list)
    lengths, eos = [], []
    for it, (text, n, has_eos) in zip(items, answers):
        kind = str(it.get("type", "open"))
        scene = scenes[it["image"]]
        v = judge(scene, text, question_of(it))
        per[kind].append((v, len(scene.objects)))
        lengths.append(n)
        eos.append(has_eos)
        if kind == "yes_no":
            correct[kind].append(judge_yes_no(text, str(it["answer"])))
        elif kind == "multiple_choice":
            correct[kind].append(judge_choice(text, str(it["answer"])))
    res = {"n": sum(len(rows) for rows in per.values()), **_verdict_figures([r for rows in per.values() for r in rows]),
           "mean_tokens": _mean(lengths), "eos_rate": _mean(eos)}
    for kind, rows in sorted(per.items()):
        res[f"{kind}_n"] = len(rows)
        res.update({f"{kind}_{k}": v for k, v in _verdict_figures(rows).items()})
    for kind, rows in correct.items():
        res[f"{kind}_accuracy"] = _mean(rows)
    return res


def _verdict_figures(rows: list) -> dict:
    verdicts = [v for v, _ in rows]
    true = sum(len(v.true_claims) for v in verdicts)
    false = sum(len(v.hallucinations) for v in verdicts)
    return {"hallucination_rate": _mean(v.hallucinated for v in verdicts),
            "mean_score": _mean(v.score for v in verdicts),
            "false_claims": _mean(len(v.hallucinations) for v in verdicts),
            "true_claims": _mean(len(v.true_claims) for v in verdicts),
            "claim_precision": true / (true + false) if true + false else float("nan"),
            "coverage": _mean(v.covered / max(n, 1) for v, n in rows)}


def evaluate_model(model, split_root: str | Path, *, limit: int = 0, max_new_tokens: int = 64,
                   batch: int = 32, examples: int = 0) -> dict:
    """Greedy answers on the held-out split, judged (`examples` > 0: keep that many answer texts)."""
    root = Path(split_root)
    items = heldout_items(root, limit)
    answers = greedy_answers(model, items, root / "images", max_new_tokens=max_new_tokens, batch=batch)
    res = score_answers(root, items, answers)
    if examples:
        res["examples"] = [{"q": question_of(it), "a": a[0]} for it, a in zip(items[:examples], answers)]
    return res


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else float("nan")
