"""`factedge verify`: run the GGUF files and the PyTorch model on the same inputs and compare.

Image embeddings (per-token cosine), next-token distributions after an image prompt (top-1
agreement, mean KL) and greedy continuations, for every LM and mmproj file of a bundle; the LoRA,
merged or as a runtime adapter, is compared with PEFT applied unmerged in PyTorch (how LLaVA-RLHF's
authors run it). Thresholds are the project's promises; `failures()` lists the ones not met.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from factedge.convert.fidelity import EmbeddingFigures, LogitFigures
from factedge.convert.reference import TorchLlava
from factedge.convert.specs import Checkpoint
from factedge.convert.vocab_read import hf_tokenizer
from factedge.edge.image import ImageSource, load_image, prepare_image
from factedge.edge.manifest import Manifest, read_manifest
from factedge.edge.prompt import prompt_pieces, single_turn
from factedge.edge.image_encoder import ImageEncoder
from factedge.edge.runtime import Context, ContextOptions, LoraAdapter, Model
from factedge.edge.vision_model import model_format

# promised figures, by file dtype (others are reported, not enforced). F32 must be exact up to float
# rounding: missing that is a converter or runtime bug. Quantized files are reported: their top-1
# agreement depends on how decisive the model is (a random-weight model has Gaussian logit gaps).
EMBED_MIN_COSINE = {"f32": 0.9999, "f16": 0.999}
LOGIT_MIN_TOP1 = {"F32": 1.0}
LOGIT_MAX_KL = {"F32": 1e-5}
GREEDY_IDENTICAL = ("F32",)


@dataclass
class VerifyOptions:
    images: Sequence[tuple[str, ImageSource]] | None = None  # default: synthetic test images
    question: str = "What is in this image? Describe it in detail."
    n_greedy: int = 32
    threads: int = 0
    n_ctx: int = 2048
    kv_type: str = "f32"  # an f16 KV cache alone moves f32 logits by ~0.1: keep it out of the figures


def sample_images(image_size: int) -> list[tuple[str, np.ndarray]]:
    """Deterministic test images: square at native and 2x size, and a non-square one (padded)."""

    def scene(w: int, h: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 127 // max(w + h, 1)], -1)
        img = Image.fromarray(base.astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
            x1, y1 = x0 + int(rng.integers(6, max(7, w // 3))), y0 + int(rng.integers(6, max(7, h // 3)))
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=color)
        return np.asarray(img)

    s = image_size
    return [("square-native", scene(s, s, 1)), ("square-2x", scene(2 * s, 2 * s, 2)),
            ("wide-3x2", scene(3 * s // 2, s, 3))]


@dataclass
class VerifyReport:
    embeddings: dict[str, list[EmbeddingFigures]] = field(default_factory=dict)  # by mmproj dtype
    logits: dict[str, LogitFigures] = field(default_factory=dict)  # by LM dtype (+ "+adapter")
    tokenizer: dict[str, Any] = field(default_factory=dict)

    def failures(self) -> list[str]:
        out = []
        for dtype, figs in self.embeddings.items():
            floor = EMBED_MIN_COSINE.get(dtype)
            for f in figs:
                if floor is not None and f.min_cosine < floor:
                    out.append(f"mmproj {dtype} {f.image}: min cosine {f.min_cosine:.6f} < {floor}")
        for dtype, f in self.logits.items():
            base = dtype.split("+")[0]
            if base in LOGIT_MIN_TOP1 and f.top1_agreement < LOGIT_MIN_TOP1[base]:
                out.append(f"LM {dtype}: top-1 agreement {f.top1_agreement:.4f} < {LOGIT_MIN_TOP1[base]}")
            if base in LOGIT_MAX_KL and f.mean_kl > LOGIT_MAX_KL[base]:
                out.append(f"LM {dtype}: mean KL {f.mean_kl:.2e} > {LOGIT_MAX_KL[base]:.0e}")
            if base in GREEDY_IDENTICAL and not f.greedy_identical:
                out.append(f"LM {dtype}: greedy continuation differs after {f.greedy_common} tokens")
        if self.tokenizer.get("mismatches"):
            out.append(f"tokenizer: {self.tokenizer['mismatches']} of {self.tokenizer['texts']} texts differ from HF")
        return out

    def to_dict(self) -> dict:
        return {
            "embeddings": {k: [vars(f) for f in v] for k, v in self.embeddings.items()},
            "logits": {k: v.to_dict() for k, v in self.logits.items()},
            "tokenizer": self.tokenizer,
            "failures": self.failures(),
        }


def prompt_segments(model: Model, question: str) -> list[list[int] | None]:
    """A single-turn prompt in the model's own format as token pieces (None = the image), tokenised
    by the GGUF as the edge tokenises it."""
    return prompt_pieces(single_turn(question, 1, model_format(model, None)), model.tokenize)


def embedding_figures(ref: TorchLlava, encoder: ImageEncoder, images, image_size: int, pad) -> list[EmbeddingFigures]:
    figs = []
    for name, image in images:
        pixels = prepare_image(load_image(image), image_size, pad)
        figs.append(EmbeddingFigures.compare(name, ref.image_embeddings(pixels), encoder.encode(pixels)))
    return figs


def logit_figures(ref: TorchLlava, model: Model, encoder: ImageEncoder, image: np.ndarray, question: str,
                  n_greedy: int, options: VerifyOptions, adapter: LoraAdapter | None = None) -> LogitFigures:
    pieces = prompt_segments(model, question)
    ref_segments = [image if p is None else p for p in pieces]
    embd = encoder.encode(image)
    gguf_segments = [embd if p is None else p for p in pieces]
    ctx_options = ContextOptions(n_ctx=options.n_ctx, n_threads=options.threads, kv_type=options.kv_type,
                                 flash_attn=False)
    with Context(model, ctx_options) as ctx:
        if adapter is not None:
            ctx.set_adapters([(adapter, 1.0)])
        got = ctx.feed(gguf_segments, all_logits=True)
        ctx.reset()
        greedy_gguf = ctx.greedy(gguf_segments, n_greedy, stop_at_eog=False)
    want = ref.logits(ref_segments)
    greedy_ref = ref.greedy(ref_segments, n_greedy, stop_at_eos=False)
    return LogitFigures.compare(want, got, greedy_ref, greedy_gguf)


# texts beside llama.cpp's test vectors: digit runs, whitespace runs, mixed scripts
EXTRA_TEXTS = ("3.14159 and 1,000,000 and 12345678", "tabs\tand\n\nnewlines  \n   runs of   spaces",
               "h\u00e9llo w\u00f6rld \u2014 \u4f60\u597d \U0001f642 \u03a9\u03bc\u03ad\u03b3\u03b1",
               "don't, won't; it's I'M here")


def special_texts(hf) -> list[str]:
    """Texts that hold the tokenizer's special tokens between words (HF splits them out of any text)."""
    specials = [t for t in hf.all_special_tokens if t][:6]
    return [f"{a}Hello {b} world{a}\n{b}" for a, b in zip(specials, specials[1:] + specials[:1])]


def tokenizer_figures(model: Model, ckpt: Checkpoint, texts: Sequence[str]) -> dict[str, Any]:
    """llama.cpp's tokenisation of the GGUF vs the checkpoint's own HF tokenizer, text by text: the
    given texts plus EXTRA_TEXTS as plain text, and special-token texts parsed as HF parses them."""
    hf = hf_tokenizer(Path(ckpt.tokenizer_dir))
    cases = [(t, False) for t in [*texts, *EXTRA_TEXTS]] + [(t, True) for t in special_texts(hf)]
    bad = [t for t, special in cases if model.tokenize(t, add_bos=True, special=special) != hf(t).input_ids]
    return {"texts": len(cases), "mismatches": len(bad), "first_mismatch": bad[0] if bad else None}


def verify_files(ckpt: Checkpoint, files: dict[str, Path], mmprojs: dict[str, Path], *,
                 adapter: Path | None = None, lora: str | None = None,
                 options: VerifyOptions | None = None, tokenizer_texts: Sequence[str] = ()) -> VerifyReport:
    """Compare each LM file (by dtype) and each mmproj (by dtype) against PyTorch.

    lora: None (no LoRA), "merged" (the LM files contain it) or "adapter" (apply `adapter` at runtime);
    either way the reference runs PEFT unmerged.
    """
    options = options or VerifyOptions()
    vspec = ckpt.vision
    images = list(options.images or sample_images(vspec.image_size))
    ref = TorchLlava.from_checkpoint(ckpt, adapter="peft" if lora else None)
    report = VerifyReport()
    first_image = prepare_image(load_image(images[0][1]), vspec.image_size, vspec.pad_color)
    for dtype, lm_path in files.items():
        with Model(lm_path) as model:
            if tokenizer_texts and not report.tokenizer:
                report.tokenizer = tokenizer_figures(model, ckpt, tokenizer_texts)
            for mm_dtype, mm_path in mmprojs.items():
                with ImageEncoder(mm_path, model, n_threads=options.threads, flash_attn=False) as enc:
                    if mm_dtype not in report.embeddings:
                        report.embeddings[mm_dtype] = embedding_figures(ref, enc, images, vspec.image_size, vspec.pad_color)
                    if mm_dtype != _best(mmprojs):
                        continue
                    lora_handle = LoraAdapter(model, adapter) if lora == "adapter" and adapter else None
                    key = dtype + ("+adapter" if lora_handle else "")
                    report.logits[key] = logit_figures(ref, model, enc, first_image, options.question,
                                                       options.n_greedy, options, lora_handle)
                    if lora_handle:
                        lora_handle.close()
    return report


def _best(mmprojs: dict[str, Path]) -> str:
    """The most precise mmproj present: LM comparisons use it so they measure the LM alone."""
    for dtype in ("f32", "f16", "q8_0"):
        if dtype in mmprojs:
            return dtype
    return next(iter(mmprojs))


def default_tokenizer_texts() -> list[str]:
    """llama.cpp's SPM tokenizer test texts (shipped with the native build): unicode, spaces, digits."""
    from factedge.edge.errors import FactedgeError
    from factedge.edge.native import spm_vocab
    from factedge.edge.tokenizer_vectors import read_test_vectors

    try:
        return [text for text, _ in read_test_vectors(spm_vocab())]
    except FactedgeError:
        return []


def verify_bundle(bundle: Path, ckpt: Checkpoint, options: VerifyOptions | None = None,
                  tokenizer_texts: Sequence[str] | None = None) -> tuple[Manifest, VerifyReport]:
    """Everything `factedge verify` reports for a bundle; the tokenizer is checked against the
    checkpoint's own HF tokenizer on llama.cpp's test texts unless other texts are given."""
    bundle = Path(bundle)
    if tokenizer_texts is None:
        tokenizer_texts = default_tokenizer_texts()
    manifest = read_manifest(bundle)
    files = {f.dtype: bundle / f.name for f in manifest.by_role("model")}
    mmprojs = {f.dtype: bundle / f.name for f in manifest.by_role("mmproj")}
    adapters = manifest.by_role("adapter")
    adapter = bundle / adapters[0].name if adapters else None
    report = verify_files(ckpt, files, mmprojs, adapter=adapter, lora=manifest.lora, options=options,
                          tokenizer_texts=tokenizer_texts)
    return manifest, report
