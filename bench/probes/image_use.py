"""Is an SFT model using the image? Its answer-token loss with the right image, a shuffled one and zero
image embeddings; equal losses mean a blind model.

    python -m bench.probes.image_use <cache>/demo/recipe/recipe-<key> [--n 96] [--model OTHER_SFT] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from factedge.train.conversation import encode_conversation
from factedge.train.model import load_for_training


def mean_loss(model, encoded, images, batch: int = 16) -> float:
    total = count = 0
    with torch.no_grad():
        for i in range(0, len(encoded), batch):
            ids = [e[0] for e in encoded[i:i + batch]]
            labels = [e[1] for e in encoded[i:i + batch]]
            embeds = model.embed_images(images[i:i + batch])
            if images is ZEROS:
                embeds = torch.zeros_like(embeds)
            loss, n = model.lm_loss(model.splice(ids, embeds, labels=labels))
            total, count = total + float(loss) * n, count + n
    return total / count


ZEROS: list = []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe", type=Path, help="a recipe folder holding LLaVA-RLHF-shapes/ and world/")
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--model", type=Path, help="another SFT model on the same world (default: the recipe's)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_for_training(args.model or args.recipe / "LLaVA-RLHF-shapes" / "sft_model").eval()
    for split in ("world", "world/heldout"):
        items = [it for it in json.loads((args.recipe / split / "sft.json").read_text()) if it.get("image")][:args.n]
        images = [args.recipe / split / "images" / it["image"] for it in items]
        encoded = [encode_conversation(it, model.tokenizer, fmt=model.chat_format) for it in items]
        shuffled = images[:]
        random.Random(0).shuffle(shuffled)
        ZEROS[:] = images
        right, wrong, zero = (mean_loss(model, encoded, imgs) for imgs in (images, shuffled, ZEROS))
        print(f"{split}: right image {right:.4f}  shuffled {wrong:.4f}  zero embeddings {zero:.4f}")


if __name__ == "__main__":
    main()
