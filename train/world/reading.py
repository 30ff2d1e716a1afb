"""Text-only reading items: answer from captions given in the prompt, or check a text against them.

Why: the fact-augmented reward model only helps if its LM can read a list of captions and compare a
response with it. LLaVA-RLHF gets that skill for free from Vicuna's language pretraining; the world's
tiny LM is trained from scratch and never reads a caption list, and without this its fact RM scored
the same held-out pair accuracy as the plain RM (0.655 vs 0.657, BENCHMARKS.md). These items are the
stand-in for that pretraining, as `vision_pretrain.py` is for CLIP's: mixed into SFT, no image.

Two kinds, half each:
  - question:     the captions, then a world question; the answer is the reference answer.
  - verification: a description (true, or with 1-2 injected hallucinations), then the captions, then
                  "Is the description fully supported by the captions?" -> "Yes." / "No. <the kind of
                  the first injected error>". The text comes before the captions, as the response
                  does in the reward prompt.
The plain RM starts from the same SFT model, so the facts-vs-plain comparison stays fair: only the
fact RM has captions in its prompt to read.
"""

from __future__ import annotations

import random

from .describe import captions
from .hallucinate import corrupt_description
from .questions import describe_qa, vqa_items
from .scene import Scene, WorldConfig

VERIFY_QUESTION = "Is the description fully supported by the captions?"
_KIND_WORDS = {"extra_object": "It mentions an object the captions do not have.",
               "wrong_color": "A colour is wrong.", "wrong_shape": "A shape is wrong.",
               "wrong_count": "The number of objects is wrong.", "wrong_size": "A size is wrong.",
               "wrong_position": "A position is wrong."}


def caption_list(facts: list[str]) -> str:
    return "Captions:\n" + "".join(f"  - {fact}\n" for fact in facts)


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def reading_items(stem: str, scene: Scene, rng: random.Random, cfg: WorldConfig) -> list[dict]:
    """`cfg.reading_per_image` text-only SFT items for `scene` (ids `<stem>-read<k>`)."""
    items = []
    for k in range(cfg.reading_per_image):
        facts = captions(scene, rng)
        rng.shuffle(facts)
        if rng.random() < 0.5:
            qas = vqa_items(scene, rng, 1, cfg)
            if not qas:
                continue
            turns = _turns(caption_list(facts) + qas[0].question, qas[0].answer)
        else:
            text, answer = _verification(scene, rng, cfg)
            turns = _turns(f"Description: {text}\n" + caption_list(facts) + VERIFY_QUESTION, answer)
        items.append({"id": f"{stem}-read{k}", "conversations": turns})
    return items


def _verification(scene: Scene, rng: random.Random, cfg: WorldConfig) -> tuple[str, str]:
    if rng.random() < 0.5:
        return describe_qa(scene, rng).answer, "Yes."
    bad = corrupt_description(scene, rng, rng.choice((1, 1, 2)), cfg)
    return bad.text, "No. " + _KIND_WORDS[bad.kinds[0]]
