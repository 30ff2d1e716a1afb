"""Can the recipe's tiny LM learn to check a description against captions from text alone?

The probe behind BENCHMARKS.md's "language-pretraining stand-in" figure: a LLaMA of the recipe's shape
(real 32k vocab, HF training init), trained from scratch on one text-only task in the reward model's
order: a description (true, or with 1-2 injected errors, train/world/hallucinate.py), then the five
captions, then "Is the description fully supported by the captions? Answer:" -> Yes / No. Loss on
that one answer token only (no 32k-wide head over the whole sequence). Fresh scenes every step;
accuracy on 400 fixed held-out items every `--eval-every` steps, one JSON line each.

    python -m bench.probes.reading_pretrain --layers 2 --hidden 128 --steps 1000 --batch 32 --threads 1
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from factedge.convert.specs import TextSpec
from factedge.train.base.base_model import training_init
from factedge.train.base.spm_vocab import default_vocab_path, tokenizer_model_bytes
from factedge.train.world.describe import captions, describe
from factedge.train.world.hallucinate import corrupt_description
from factedge.train.world.reading import VERIFY_QUESTION, caption_list
from factedge.train.world.scene import WorldConfig, random_scene


def real_tokenizer():
    """The real LLaMA SPM tokenizer the recipe's base uses (from the vocab in llama-cpp-python's sdist)."""
    from factedge.train.base.tiny import write_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="reading-pretrain-"))
    write_tokenizer(folder, tokenizer_model_bytes(default_vocab_path()), hf=False)  # original LLaVA's files
    return AutoTokenizer.from_pretrained(str(folder), legacy=True)


def item(rng: random.Random, cfg: WorldConfig) -> tuple[str, int]:
    scene = random_scene(rng, cfg)
    facts = captions(scene, rng)
    rng.shuffle(facts)
    if rng.random() < 0.5:
        text, label = describe(scene), 1
    else:
        text, label = corrupt_description(scene, rng, rng.choice((1, 1, 2)), cfg).text, 0
    return f"Description: {text}\n" + caption_list(facts) + VERIFY_QUESTION + " Answer:", label


def batch(tok, rng: random.Random, n: int, cfg: WorldConfig):
    texts, labels = zip(*(item(rng, cfg) for _ in range(n)))
    enc = [tok.encode(t) for t in texts]
    width = max(map(len, enc))
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, e in enumerate(enc):  # left-padded: every answer position is the last one
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    return ids, mask, torch.tensor(labels)


def answer_logits(model, ids, mask, yes_no):
    pos = (torch.cumsum(mask, 1) - 1).clamp(min=0)
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[:, -1]
    return model.lm_head(hidden)[:, yes_no]  # [B, 2]: No, Yes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok, cfg = real_tokenizer(), WorldConfig()
    yes_no = [tok.encode("No", add_special_tokens=False)[-1], tok.encode("Yes", add_special_tokens=False)[-1]]
    mlp = args.hidden * 344 // 128  # the cpu preset's ratio
    spec = TextSpec(32000, args.hidden, mlp, args.layers, 4, 4, 2048)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=mlp,
                                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4))
    model.load_state_dict(training_init(spec, args.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng, held_out = random.Random(f"train-{args.seed}"), random.Random("held-out")
    evals = [batch(tok, held_out, 100, cfg) for _ in range(4)]
    start = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                hits = sum(int((answer_logits(model, i, m, yes_no).argmax(-1) == y).sum()) for i, m, y in evals)
            model.train()
            print(json.dumps({"step": step, "held_out_accuracy": hits / 400,
                              "seconds": round(time.perf_counter() - start, 1)}), flush=True)
        if step == args.steps:
            break
        ids, mask, labels = batch(tok, rng, args.batch, cfg)
        loss = F.cross_entropy(answer_logits(model, ids, mask, yes_no), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


if __name__ == "__main__":
    main()
