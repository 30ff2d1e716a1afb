"""Can a real pretrained LM check a description against captions? SmolLM2-135M-Instruct, zero-shot.

The fact-augmented reward model needs an LM that reads: given the image's captions, a description
with a wrong colour, shape, size or position must score below the true one. The recipe's tiny LMs
cannot (BENCHMARKS.md: fact RM 0.537 vs plain 0.504). This probe asks the real SmolLM2, with no
training at all, in its own ChatML format, whether a description is supported: the score of a
description is logit("Yes") - logit("No") for the first answer token. Pairs are a scene's true
description and the same description with one error (train/world/hallucinate.py), kept only when
both have the same number of words, so a length shortcut scores 50%. "fact": the captions are in
the prompt; "plain": the same question with no captions (what a plain RM has to go on).

    python -m bench.probes.smol_reader --pairs 200 --threads 2
    python -m bench.probes.smol_reader --form verify --pairs 60 --threads 2

`--form paper|verify` asks through the reward model's own prompt instead (train/rm/prompt.py's
REWARD_FORMS, in ChatML, no image: the description is the answer to "Describe the image in detail.",
then the form's rating request with or without the captions) and scores the form's verdict words,
logit(good) - logit(bad) at the score position: what the RM's head starts as with `reading_head`
(rm.model.reading_head), before any training.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from factedge.train.world.describe import captions, describe
from factedge.train.world.hallucinate import corrupt_description
from factedge.train.world.reading import VERIFY_QUESTION, caption_list
from factedge.train.world.scene import WorldConfig, random_scene

PLAIN_QUESTION = "Is the description of the picture accurate?"


def pairs(n: int, seed: str) -> list[tuple[list[str], str, str]]:
    """(captions, true description, corrupted description) with equal word counts."""
    rng, cfg, out = random.Random(seed), WorldConfig(), []
    while len(out) < n:
        scene = random_scene(rng, cfg)
        facts = captions(scene, rng)
        rng.shuffle(facts)
        true, wrong = describe(scene), corrupt_description(scene, rng, 1, cfg).text
        if wrong != true and len(wrong.split()) == len(true.split()):
            out.append((facts, true, wrong))
    return out


def prompt(tok, facts: list[str] | None, description: str) -> str:
    if facts is None:
        user = f"Description: {description}\n{PLAIN_QUESTION} Answer Yes or No."
    else:
        user = f"{caption_list(facts)}Description: {description}\n{VERIFY_QUESTION} Answer Yes or No."
    return tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)


def reward_prompt(form: str, facts: list[str] | None, description: str) -> str:
    from factedge.edge.chat_format import CHATML
    from factedge.edge.prompt import Turn
    from factedge.train.rm.prompt import reward_text

    turn = Turn("Describe the image in detail.", description, 0)
    return reward_text([turn], description, facts, fmt=CHATML, form=form)


def scores(model, tok, texts: list[str], yes: int, no: int, batch: int = 16) -> list[float]:
    out = []
    tok.padding_side = "left"
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**enc).logits[:, -1]
        out += (logits[:, yes] - logits[:, no]).tolist()
    return out


def main() -> None:
    from transformers import AutoModelForCausalLM

    from factedge.train.base.smol import smol_gguf, smol_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", default="smol-reader-heldout")
    ap.add_argument("--form", choices=("question", "paper", "verify"), default="question")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gguf = smol_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = smol_tokenizer()
    if args.form != "question":
        from factedge.edge.chat_format import CHATML
        from factedge.train.rm.model import score_token
        from factedge.train.rm.prompt import reward_form

        yes, no = (score_token(tok, w, CHATML, args.form) for w in reward_form(args.form).words)
        ask = lambda facts, d: reward_prompt(args.form, facts, d)  # noqa: E731
    else:
        yes, no = tok.encode("Yes", add_special_tokens=False)[0], tok.encode("No", add_special_tokens=False)[0]
        ask = lambda facts, d: prompt(tok, facts, d)  # noqa: E731
    data = pairs(args.pairs, args.seed)
    result, start = {"pairs": len(data), "form": args.form}, time.perf_counter()
    for name, with_facts in (("fact", True), ("plain", False)):
        texts = [ask(facts if with_facts else None, d) for facts, true, wrong in data for d in (true, wrong)]
        s = scores(model, tok, texts, yes, no)
        true_s, wrong_s = s[0::2], s[1::2]
        result[name] = {
            "pair_accuracy": round(sum(t > w for t, w in zip(true_s, wrong_s)) / len(data), 3),
            "ties": sum(t == w for t, w in zip(true_s, wrong_s)),
            "says_yes_true": round(sum(t > 0 for t in true_s) / len(data), 3),
            "says_yes_wrong": round(sum(w > 0 for w in wrong_s) / len(data), 3),
        }
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
