"""Write a shapes world to disk in the real LLaVA / LLaVA-RLHF data formats (FACT_RLHF.md).

Layout of `out/` (each split is self-contained: its json files sit beside its `images/` folder):

    images/<id>.png            the train pictures; <id> is numeric (LLaVA-RLHF's PPO loader parses the
                               file stem as an int): train 0000000.., held-out 5000000.. (never clash)
    scenes.json                {"<id>.png": scene dict}: what the judge checks answers against
    sft.json                   LLaVA conversations: one describe item + `questions_per_image` VQA /
                               multiple-choice items per image; a `sft_hallucination_rate` share of
                               the describe answers carries one injected hallucination; plus
                               `reading_per_image` text-only caption-reading items (reading.py)
    image_to_caption.json      {"<id>.png": [5 captions]}: the facts for the reward model
    preference.json            LLaVA-Human-Preference-10K items; `preference` = the judge's choice
                               (fewer hallucinations wins; ties broken by the MMHal score)
    ppo_prompts.json           SFT-style items (human turn + reference gpt turn, as LLaVA-RLHF's PPO
                               loader expects) plus `type` and `answer` (the correctness target:
                               letter / "Yes" / "No" for multiple choice / yes-no, else the reference)
    world.json                 seed, config, counts, ids of SFT items with injected hallucinations
    heldout/                   images/ and the same five json files for the held-out pictures

Held-out images come from their own seed stream (`derive_seed(seed, "heldout", i)`), and any held-out
scene that looks the same as a train scene is redrawn, so evaluation never sees a training picture.
Everything is a function of (seed, n_images, cfg): the same call writes byte-identical files. Each
file is written to a temp name and moved into place.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from factedge.edge.atomic import write_bytes, write_json
from factedge.edge.errors import CorruptFileError, InputError

from .describe import captions
from .hallucinate import PAIR_KINDS, corrupt_answer, corrupt_description, partial_description
from .judge import judge
from .questions import DESCRIBE_PROMPTS, QA, QuestionSpec, describe_qa, make_spec, qa_of, vqa_items
from .reading import reading_items
from .render import render
from .scene import Scene, WorldConfig, derive_seed, scene_for

HELDOUT_ID_BASE = 5_000_000
HUMAN, GPT = "human", "gpt"


@dataclass
class WorldFiles:
    """Paths of one split (the train split at the top, the held-out one in `heldout`)."""

    root: Path
    images: Path
    scenes: Path
    sft: Path
    captions: Path
    preference: Path
    ppo_prompts: Path
    n_images: int
    counts: dict = field(default_factory=dict)
    manifest: Path | None = None
    heldout: "WorldFiles | None" = None


def write_world_json(path: Path, obj) -> None:
    """The world's data files: one compact line of JSON (they are read by programs, and large)."""
    write_json(path, obj, indent=None)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6, compress_type=3)  # zlib Z_RLE: flat images
    return buf.getvalue()


def read_scenes(path: str | Path) -> dict[str, Scene]:
    """scenes.json -> {image file name: Scene}."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputError("no such file", path) from exc
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"not a scenes json ({exc})", path) from exc
    if not isinstance(raw, dict):
        raise CorruptFileError("scenes json must map image names to scenes", path)
    try:
        return {k: Scene.from_dict(v) for k, v in raw.items()}
    except InputError as exc:
        raise CorruptFileError(exc.reason, path) from exc


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": HUMAN, "value": f"<image>\n{question}"}, {"from": GPT, "value": answer}]


def _sft_items(image: str, scene: Scene, rng: random.Random, cfg: WorldConfig) -> tuple[list[dict], list[str]]:
    stem = image.rsplit(".", 1)[0]
    qas = [describe_qa(scene, rng), *vqa_items(scene, rng, cfg.questions_per_image, cfg)]
    items, injected = [], []
    for k, qa in enumerate(qas):
        answer = qa.answer
        item_id = f"{stem}-sft{k}"
        if qa.type == "describe" and rng.random() < cfg.sft_hallucination_rate:
            answer = corrupt_description(scene, rng, 1, cfg).text
            injected.append(item_id)
        items.append({"id": item_id, "image": image, "conversations": _turns(qa.question, answer)})
    return items, injected


def _pair(scene: Scene, qa: QA, rng: random.Random, cfg: WorldConfig) -> tuple[str, str] | None:
    """(better, worse) answers to `qa` as the judge ranks them, or None if it cannot tell them apart."""
    roll = rng.random()
    describe = qa.type == "describe"
    if describe and roll < 0.25:
        a, b = corrupt_description(scene, rng, 1, cfg, PAIR_KINDS), corrupt_description(scene, rng, 2, cfg, PAIR_KINDS)
        first, second = a.text, b.text
    elif describe and roll >= 1 - cfg.partial_pair_share and (partial := partial_description(scene, rng)):
        first, second = partial, corrupt_description(scene, rng, 1, cfg, PAIR_KINDS).text  # true but incomplete
    elif describe:
        first, second = qa.answer, corrupt_description(scene, rng, 2 if roll < 0.4 else 1, cfg, PAIR_KINDS).text
    else:
        bad = corrupt_answer(scene, qa.spec, rng, cfg)
        if bad is None:
            return None
        first, second = qa.answer, bad.text
    v1, v2 = judge(scene, first, qa.question), judge(scene, second, qa.question)
    k1, k2 = (len(v1.hallucinations), -v1.score), (len(v2.hallucinations), -v2.score)
    if k1 == k2:
        return None
    return (first, second) if k1 < k2 else (second, first)


def _preference_items(image: str, scene: Scene, rng: random.Random, cfg: WorldConfig) -> list[dict]:
    stem = image.rsplit(".", 1)[0]
    items = []
    for _ in range(4 * cfg.pairs_per_image):
        if len(items) >= cfg.pairs_per_image:
            break
        if rng.random() < cfg.describe_pair_share:
            qa = describe_qa(scene, rng)
        else:
            qas = vqa_items(scene, rng, 1, cfg)
            if not qas:
                continue
            qa = qas[0]
        pair = _pair(scene, qa, rng, cfg)
        if pair is None:
            continue
        better, worse = pair
        swap = rng.random() < 0.5
        out1, out2 = (worse, better) if swap else (better, worse)
        items.append({"id": f"{stem}-pref{len(items)}", "image": image,
                      "conversations": _turns(qa.question, out1),
                      "output_1": {"value": out1}, "output_2": {"value": out2},
                      "preference": 2 if swap else 1})
    return items


def _ppo_items(image: str, scene: Scene, rng: random.Random, cfg: WorldConfig) -> list[dict]:
    stem = image.rsplit(".", 1)[0]
    n_describe = sum(rng.random() < cfg.describe_prompt_share for _ in range(cfg.ppo_prompts_per_image))
    first = rng.randrange(len(DESCRIBE_PROMPTS))
    qas = [qa_of(QuestionSpec("describe", prompt=DESCRIBE_PROMPTS[(first + k) % len(DESCRIBE_PROMPTS)]), scene)
           for k in range(min(n_describe, len(DESCRIBE_PROMPTS)))]
    qas += vqa_items(scene, rng, cfg.ppo_prompts_per_image - len(qas), cfg)
    items = []
    for k, qa in enumerate(qas):
        item = {"id": f"{stem}-ppo{k}", "image": image, "conversations": _turns(qa.question, qa.answer),
                "type": qa.type, "answer": qa.truth if qa.type in ("yes_no", "multiple_choice") else qa.answer}
        if qa.type == "describe" and cfg.describe_length_bonus is not None:
            item["length_bonus"] = cfg.describe_length_bonus
        items.append(item)
    return items


def _split_scenes(seed: int, n: int, split: str, cfg: WorldConfig, avoid: set) -> list[Scene]:
    scenes = []
    for i in range(n):
        for attempt in range(1000):
            s = scene_for(derive_seed(seed, split, i, attempt), cfg)
            if s.signature() not in avoid:
                break
        scenes.append(s)
    return scenes


def _write_split(root: Path, images_dir: Path, split: str, scenes: list[Scene], id_base: int,
                 seed: int, cfg: WorldConfig) -> tuple[WorldFiles, list[str]]:
    scene_map, sft, prefs, ppo, caps, injected = {}, [], [], [], {}, []
    for i, scene in enumerate(scenes):
        image = f"{id_base + i:07d}.png"
        write_bytes(images_dir / image, png_bytes(render(scene, cfg.image_size)))
        scene_map[image] = scene.to_dict()
        rng = random.Random(derive_seed(seed, split, i, "text"))
        caps[image] = captions(scene, rng)
        items, inj = _sft_items(image, scene, rng, cfg)
        sft += items
        injected += inj
        if cfg.reading_per_image:  # its own stream: the other files stay as without reading items
            sft += reading_items(image.rsplit(".", 1)[0], scene, random.Random(derive_seed(seed, split, i, "read")), cfg)
        prefs += _preference_items(image, scene, rng, cfg)
        ppo += _ppo_items(image, scene, rng, cfg)
    files = WorldFiles(root, images_dir, root / "scenes.json", root / "sft.json", root / "image_to_caption.json",
                       root / "preference.json", root / "ppo_prompts.json", len(scenes))
    write_world_json(files.scenes, scene_map)
    write_world_json(files.sft, sft)
    write_world_json(files.captions, caps)
    write_world_json(files.preference, prefs)
    write_world_json(files.ppo_prompts, ppo)
    files.counts = {"images": len(scenes), "sft": len(sft), "sft_injected": len(injected),
                    "preference": len(prefs), "ppo_prompts": len(ppo),
                    "preference_first_better": sum(p["preference"] == 1 for p in prefs)}
    return files, injected


def write_world(out_dir: str | Path, n_images: int, seed: int = 0, cfg: WorldConfig | None = None) -> WorldFiles:
    """Write `n_images` train images (+ held-out ones) and every training file; see the module doc."""
    cfg = cfg or WorldConfig()
    if not 1 <= n_images <= HELDOUT_ID_BASE:
        raise InputError(f"n_images must be within 1..{HELDOUT_ID_BASE}, got {n_images}")
    out = Path(out_dir)
    images_dir = out / "images"
    train_scenes = _split_scenes(seed, n_images, "train", cfg, set())
    n_held = max(1, round(n_images * cfg.heldout_fraction))
    held_scenes = _split_scenes(seed, n_held, "heldout", cfg, {s.signature() for s in train_scenes})
    train, inj_train = _write_split(out, images_dir, "train", train_scenes, 0, seed, cfg)
    held, inj_held = _write_split(out / "heldout", out / "heldout" / "images", "heldout", held_scenes,
                                  HELDOUT_ID_BASE, seed, cfg)
    train.heldout = held
    train.manifest = out / "world.json"
    write_world_json(train.manifest, {"seed": seed, "n_images": n_images, "n_heldout": n_held, "config": cfg.to_dict(),
                                "image_folder": "images", "counts": {"train": train.counts, "heldout": held.counts},
                                "sft_injected_ids": inj_train + inj_held})
    return train


def default_question(topic: str, scene: Scene, seed: int = 0) -> QA | None:
    """One question of `topic` on `scene` (handy for evaluation scripts)."""
    spec = make_spec(topic, scene, random.Random(seed))
    return qa_of(spec, scene) if spec else None
