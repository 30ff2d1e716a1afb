"""Can the SFT model look things up? Yes/no on images it trained on, and reading captions in its prompt.

Why: the fact RM can only beat the plain RM if its LM can compare a response with captions in the
prompt, and a yes/no answer needs a lookup of one object among the image's patches. This prints, for
an SFT model (greedy):
  - image yes/no ("Is there a <colour> <shape> in the image?") on `--n` train and held-out items:
    accuracy and the share answered "Yes" (the truths are about half Yes);
  - text-only reading (train/world/reading.py) on fresh scenes: a world question answered from the
    five captions given in the prompt, and "is this description supported by the captions?".

    python -m bench.probes.lm_probe RECIPE_DIR                    # RECIPE_DIR holds LLaVA-RLHF-shapes/ and world/
    python -m bench.probes.lm_probe RECIPE_DIR --model OTHER_SFT_MODEL_DIR
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from bench.common import ensure_factedge


def greedy(model, prompts: list[str], images: list | None, max_new_tokens: int = 16) -> list[str]:
    import torch

    from factedge.train.conversation import encode_prompt
    from factedge.train.rl.generate import sample

    tok = model.tokenizer
    ids = [encode_prompt(p, tok, has_image=images is not None) for p in prompts]
    embeds = model.embed_images(images) if images is not None else [None] * len(ids)
    with torch.no_grad():
        got = sample(model, ids, embeds, max_new_tokens=max_new_tokens, eos_id=tok.eos_token_id, pad_id=0, top_k=1)
    return [tok.decode(t, skip_special_tokens=True).strip() for t in got.tokens]


def first_word(text: str) -> str:
    """The first sentence, lower-cased ("No. A shape is wrong." -> "no"): the reading answers' verdict."""
    return text.split(".")[0].strip().lower()


def image_yes_no(model, split: Path, n: int) -> dict:
    """Answers read by the judge's (POPE's) yes/no rule, truths too."""
    from factedge.train.world.answers import parse_yes_no

    items = [x for x in json.loads((split / "sft.json").read_text())
             if x.get("image") and "Is there a" in x["conversations"][0]["value"]][:n]
    said = [parse_yes_no(s) for s in greedy(model, [x["conversations"][0]["value"] for x in items],
                                            [split / "images" / x["image"] for x in items])]
    truth = [parse_yes_no(x["conversations"][1]["value"]) for x in items]
    return {"n": len(items), "accuracy": sum(s == t for s, t in zip(said, truth)) / len(items),
            "said_yes": sum(s == "yes" for s in said) / len(items),
            "truth_yes": sum(t == "yes" for t in truth) / len(items)}


def reading(model, n: int) -> dict:
    from factedge.train.world.reading import VERIFY_QUESTION, reading_items
    from factedge.train.world.scene import WorldConfig, scene_for

    cfg = WorldConfig(image_size=112, reading_per_image=1)
    items = [it for i in range(4 * n) for it in reading_items(f"p{i}", scene_for(10**9 + i, cfg), random.Random(i), cfg)]
    out = {}
    for name, keep in (("caption_qa", False), ("verify", True)):
        chosen = [x for x in items if x["conversations"][0]["value"].endswith(VERIFY_QUESTION) == keep][:n]
        said = greedy(model, [x["conversations"][0]["value"] for x in chosen], None, 24)
        truth = [x["conversations"][1]["value"] for x in chosen]
        out[name] = {"n": len(chosen), "exact": sum(s == t for s, t in zip(said, truth)) / len(chosen),
                     "first_word": sum(first_word(s) == first_word(t) for s, t in zip(said, truth)) / len(chosen)}
    return out


def main() -> None:
    ensure_factedge()
    import torch

    from factedge.train.model import load_for_training

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe", type=Path, help="a recipe folder holding LLaVA-RLHF-shapes/ and world/")
    ap.add_argument("--model", type=Path, help="SFT model folder (default: the recipe's sft_model)")
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_for_training(args.model or args.recipe / "LLaVA-RLHF-shapes" / "sft_model").eval()
    res = {"yes_no_train": image_yes_no(model, args.recipe / "world", args.n),
           "yes_no_heldout": image_yes_no(model, args.recipe / "world" / "heldout", args.n),
           "reading": reading(model, args.n)}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
