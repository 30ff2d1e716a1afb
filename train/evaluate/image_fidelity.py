"""`factedge eval fidelity`: the convert-time figures (convert/fidelity.py) on the user's own images.

`factedge verify` measures a bundle on three synthetic images; a user's photos (sizes, aspect
ratios, content) are what matters to them. For every image of a folder: per-token cosine of the
image embeddings for each mmproj, and for each LM file top-1 agreement, mean KL and the greedy
continuation after a question about that image, all against PyTorch (LoRA as PEFT, unmerged).
Imports torch: this is the reference path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from factedge.edge.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class FidelityOptions:
    question: str = "What is in this image? Describe it in detail."
    n_greedy: int = 32
    limit: int | None = None  # first N images (sorted by name)
    quant: str | None = None  # one LM file (default: every LM file of the bundle)
    threads: int = 0
    n_ctx: int = 2048


def image_files(folder: Path, limit: int | None = None) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("image folder not found", folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the folder", folder)
    return files[:limit] if limit is not None else files


def folder_fidelity(bundle: Path, src: Path, images: Path, *, vision_tower: Path | None = None,
                    lora: Path | None = None, options: FidelityOptions | None = None) -> dict:
    """{embeddings: {mmproj dtype: [per image]}, logits: {LM dtype: {image: figures}}, summary: {LM dtype: ...}}."""
    from factedge.convert.layouts import load_checkpoint
    from factedge.convert.reference import TorchLlava
    from factedge.convert.verify import VerifyOptions, embedding_figures, logit_figures
    from factedge.edge.image import load_image, prepare_image
    from factedge.edge.manifest import read_manifest
    from factedge.edge.image_encoder import ImageEncoder
    from factedge.edge.runtime import LoraAdapter, Model

    options = options or FidelityOptions()
    bundle = Path(bundle)
    files = image_files(images, options.limit)
    manifest = read_manifest(bundle)
    ckpt = load_checkpoint(src, vision_tower=vision_tower, lora=lora)
    vspec = ckpt.vision
    ref = TorchLlava.from_checkpoint(ckpt, adapter="peft" if manifest.lora else None)
    named = [(p.name, load_image(p)) for p in files]
    lms = [f for f in manifest.by_role("model") if options.quant is None or f.dtype.lower() == options.quant.lower()]
    if not lms:
        manifest.file("model", options.quant)  # raises, naming what the bundle has
    mmprojs = {f.dtype: bundle / f.name for f in manifest.by_role("mmproj")}
    best = next((d for d in ("f32", "f16", "q8_0") if d in mmprojs), next(iter(mmprojs)))
    adapters = manifest.by_role("adapter")
    verify_options = VerifyOptions(n_greedy=options.n_greedy, threads=options.threads, n_ctx=options.n_ctx)
    report: dict = {"images": [p.name for p in files], "embeddings": {}, "logits": {}, "summary": {}}
    for lm in lms:
        with Model(bundle / lm.name) as model:
            for mm_dtype, mm_path in mmprojs.items():
                with ImageEncoder(mm_path, model, n_threads=options.threads, flash_attn=False) as encoder:
                    if mm_dtype not in report["embeddings"]:
                        figs = embedding_figures(ref, encoder, named, vspec.image_size, vspec.pad_color)
                        report["embeddings"][mm_dtype] = [vars(f) for f in figs]
                    if mm_dtype != best:
                        continue
                    adapter = LoraAdapter(model, bundle / adapters[0].name) if manifest.lora == "adapter" else None
                    try:
                        per_image = {}
                        for name, img in named:
                            pixels = prepare_image(img, vspec.image_size, vspec.pad_color)
                            per_image[name] = logit_figures(ref, model, encoder, pixels, options.question,
                                                            options.n_greedy, verify_options, adapter).to_dict()
                    finally:
                        if adapter is not None:
                            adapter.close()
                    report["logits"][lm.dtype] = per_image
                    report["summary"][lm.dtype] = _summary(per_image)
    return report


def _summary(per_image: dict[str, dict]) -> dict:
    figs = list(per_image.values())
    positions = sum(f["positions"] for f in figs)
    return {"images": len(figs),
            "top1_agreement": sum(f["top1_agreement"] * f["positions"] for f in figs) / positions,
            "mean_kl": sum(f["mean_kl"] * f["positions"] for f in figs) / positions,
            "max_kl": max(f["max_kl"] for f in figs),
            "greedy_common": sum(f["greedy_common"] for f in figs),
            "greedy_total": sum(len(f["greedy_ref"]) for f in figs),
            "greedy_identical_images": sum(bool(f["greedy_identical"]) for f in figs)}
