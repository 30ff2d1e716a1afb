"""The demo behind `factedge demo`: a LLaVA-RLHF-layout checkpoint -> verified bundle -> an answer.

For now (before the Fact-RLHF trainer lands) the checkpoint is the tiny random-weight model the
tests use, in the exact LLaVA-RLHF layout (`sft_model/` + `rlhf_lora_adapter_model/`): the demo shows
the path a real checkpoint takes and the fidelity figures, not a meaningful answer. Everything is
cached by content, so a second run only asks the question.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from factedge.convert.bundle import ConvertOptions, Progress, convert_checkpoint
from factedge.convert.verify import sample_images
from factedge.edge.manifest import Manifest, read_manifest
from factedge.edge.sampling import SamplingOptions
from factedge.edge.session import Answer, ChatOptions, VisionChat
from factedge.train.tiny_cache import cached_tiny

ENV_CACHE = "FACTEDGE_CACHE"
QUESTION = "What shapes are in this image, and what colours are they?"


def cache_root() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "factedge")


@dataclass
class DemoResult:
    checkpoint: Path
    bundle: Path
    manifest: Manifest
    image: Path
    answers: dict[str, Answer]  # quant -> answer
    converted: bool  # False when the cached bundle was reused


def run_demo(*, quants: tuple[str, ...] = ("Q8_0", "Q4_K_M"), question: str = QUESTION, threads: int = 0,
             progress: Progress | None = None, log: Callable[[str], None] = lambda _m: None) -> DemoResult:
    cache = cache_root() / "demo"
    log("building the tiny LLaVA-RLHF-layout checkpoint (cached)")
    tiny = cached_tiny("llava-rlhf", image_size=224, cache_dir=cache / "checkpoints")
    bundle = cache / "bundles" / f"{Path(tiny.root).name}-{Path(tiny.root).parent.name}"
    converted = False
    if not (bundle / "manifest.json").is_file():
        log(f"converting {tiny.root} -> {bundle} (LoRA merged, f16 + {', '.join(quants)}, mmproj f16, verified)")
        convert_checkpoint(tiny.root, bundle, ConvertOptions(quants=list(quants), mmproj_types=["f16"], overwrite=True),
                           progress)
        converted = True
    manifest = read_manifest(bundle)
    name, pixels = sample_images(224)[2]
    image = cache / f"{name}.png"
    if not image.is_file():
        from PIL import Image

        Image.fromarray(pixels).save(image)
    answers = {}
    for quant in quants:
        log(f"asking the {quant} model about {image.name}")
        with VisionChat.open(bundle, quant=quant, options=ChatOptions(threads=threads)) as chat:
            answers[quant] = chat.ask(question, image, SamplingOptions(max_tokens=48))
    return DemoResult(Path(tiny.root), bundle, manifest, image, answers, converted)
