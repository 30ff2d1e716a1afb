"""Edge speed (issue #3): factedge (GGUF, llama.cpp) vs PyTorch/transformers on CPU, and tokens/s per quant.

Why: the point of converting to GGUF is to run on small machines; this shows what that buys over the
reference PyTorch model (same checkpoint, same prompt, same image, same greedy tokens) and how the
quant type trades file size for speed on a ~1B LLaMA with a CLIP ViT-L/14 mmproj. Both checkpoints are
built locally with random weights (real shapes) and cached. Runs are interleaved (shared, noisy
machine); medians are reported.

    python -m bench.speed.edge_vs_torch --part torch --threads 2 --reps 2 --n-predict 32
    python -m bench.speed.edge_vs_torch --part quants --threads 2 --reps 2 --n-predict 32
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from factedge.convert.specs import TextSpec, VisionSpec

from bench.common import ROOT
QUESTION = "What is shown in this image? Describe it briefly."
MIB = 2**20

# part 1: llava-hf layout, big enough that per-token overheads do not dominate, small enough for torch fp32
MED = (TextSpec(32000, 1024, 2816, 8, 16, 16), VisionSpec(336, 14, 512, 2048, 8, 8))
# part 2: a TinyLlama-width LLaMA, 16 layers (~0.95B parameters), CLIP ViT-L/14 at 224 px (256 tokens)
ONE_B = (TextSpec(32000, 2048, 5632, 16, 16, 16), VisionSpec(224, 14, 1024, 4096, 24, 16))
QUANTS_TORCH = ["Q8_0", "Q4_K_M"]
QUANTS_1B = ["Q8_0", "Q5_K_M", "Q4_K_M", "Q4_0"]


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def make_image(size: int, path: Path) -> Path:
    """A deterministic picture already at the model's size (no resize cost on either side)."""
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([(x * 255 // size), (y * 255 // size), ((x + y) * 127 // size)], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def ensure_bundle(name: str, specs: tuple[TextSpec, VisionSpec], quants: list[str], out: Path,
                  threads: int) -> tuple[Path, Path]:
    """(checkpoint root, bundle) for `specs`, built and converted once (rebuilt if the shapes change)."""
    from factedge.convert.bundle import ConvertOptions, convert_checkpoint
    from factedge.train.base.tiny import build_tiny

    text, vision = specs
    key = json.dumps({"text": asdict(text), "vision": asdict(vision), "quants": quants}, sort_keys=True)
    folder = out / f"edge-{name}"
    marker = folder / ".built.json"
    if marker.is_file():
        rec = json.loads(marker.read_text())
        if rec["key"] == key and Path(rec["root"]).is_dir() and (Path(rec["bundle"]) / "manifest.json").is_file():
            return Path(rec["root"]), Path(rec["bundle"])
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    root = build_tiny("llava-hf", folder / "ckpt", text=text, vision=vision, image_size=vision.image_size, seed=0)
    t1 = time.perf_counter()
    bundle = folder / "bundle"
    convert_checkpoint(Path(root), bundle, ConvertOptions(quants=quants, verify=False, overwrite=True,
                                                          threads=threads))
    t2 = time.perf_counter()
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps({"key": key, "root": str(root), "bundle": str(bundle),
                               "build_s": round(t1 - t0, 1), "convert_s": round(t2 - t1, 1)}))
    os.replace(tmp, marker)
    return Path(root), bundle


def open_chat(bundle: Path, quant: str, args):
    from factedge.edge.vision_model import ModelOptions, VisionModel

    return VisionModel.open(model=bundle / f"model-{quant}.gguf", mmproj=bundle / "mmproj-f16.gguf",
                           options=ModelOptions(n_ctx=args.n_ctx, threads=args.threads))


def run_factedge(chat, image: Path, args) -> dict:
    from factedge.edge.sampling import SamplingOptions

    s = chat.ask(args.question, image=image, sampling=SamplingOptions(max_tokens=args.n_predict)).stats
    return {"encode_s": s.image_encode_s, "prompt_tokens": s.prompt_tokens, "prompt_s": s.prompt_s,
            "prompt_tps": s.prompt_tokens / s.prompt_s, "gen_tokens": s.generated_tokens,
            "gen_tps": s.generated_tokens / s.generate_s if s.generate_s else 0.0}


def torch_segments(chat, image: Path) -> list:
    """The factedge prompt (same template, same token ids) with the image in its place, for TorchLlava."""
    from factedge.edge.prompt import single_turn, split_at_images

    pieces = split_at_images(single_turn(QUESTION, n_images=1),
                             lambda text, bos: chat.model.tokenize(text, add_bos=bos, special=False))
    return [image if p is None else list(p) for p in pieces]


def run_torch(ref, segments: list, args) -> dict:
    """Image encode, prompt prefill and greedy decode timed apart (the same split factedge reports)."""
    import torch

    image = next(s for s in segments if isinstance(s, Path))
    with torch.inference_mode():
        t0 = time.perf_counter()
        emb = ref.image_embeddings(image)
        t1 = time.perf_counter()
        segs = [emb if isinstance(s, Path) else s for s in segments]
        embeds = ref.input_embeddings(segs)
        out = ref.lm(inputs_embeds=embeds, use_cache=True)
        t2 = time.perf_counter()
        tokens = []
        while len(tokens) < args.n_predict:  # no EOS stop: the same count of new tokens as factedge
            tok = int(out.logits[0, -1].argmax())
            tokens.append(tok)
            if len(tokens) == args.n_predict:
                break
            out = ref.lm(input_ids=torch.tensor([[tok]]), use_cache=True, past_key_values=out.past_key_values)
        t3 = time.perf_counter()
    n = embeds.shape[1]
    # the first token comes from the prefill logits; n_predict - 1 decode steps follow
    return {"encode_s": t1 - t0, "prompt_tokens": n, "prompt_s": t2 - t1, "prompt_tps": n / (t2 - t1),
            "gen_tokens": len(tokens), "gen_tps": (len(tokens) - 1) / (t3 - t2) if len(tokens) > 1 else 0.0,
            "tokens": tokens}


def bench_torch(args, out: Path) -> str:
    import torch

    from factedge.convert.layouts import load_checkpoint
    from factedge.convert.reference import TorchLlava

    torch.set_num_threads(args.threads)
    root, bundle = ensure_bundle("med", MED, QUANTS_TORCH, out, args.threads)
    image = make_image(MED[1].image_size, out / f"image_{MED[1].image_size}.png")
    ref = TorchLlava.from_checkpoint(load_checkpoint(root))
    chats = {q: open_chat(bundle, q, args) for q in QUANTS_TORCH}
    segments = torch_segments(chats[QUANTS_TORCH[0]], image)
    run_torch(ref, segments, args)  # warm-ups: first-touch pages, allocator, thread pools
    for chat in chats.values():
        run_factedge(chat, image, args)
    runs: dict[str, list[dict]] = {"torch": [], **{q: [] for q in QUANTS_TORCH}}
    for _ in range(args.reps):  # interleaved: all sides see the same machine load
        runs["torch"].append(run_torch(ref, segments, args))
        print("torch", {k: v for k, v in runs["torch"][-1].items() if k != "tokens"}, file=sys.stderr, flush=True)
        for q, chat in chats.items():
            runs[q].append(run_factedge(chat, image, args))
            print(q, runs[q][-1], file=sys.stderr, flush=True)
    for chat in chats.values():
        chat.close()
    t = {k: _median([r[k] for r in runs["torch"]]) for k in ("encode_s", "prompt_s", "prompt_tps", "gen_tps")}
    text, vision = MED
    lines = [f"Model: llava-hf layout, LLaMA hidden {text.hidden_size} x {text.num_layers} layers "
             f"(inter {text.intermediate_size}, vocab {text.vocab_size}), CLIP hidden {vision.hidden_size} x "
             f"{vision.num_layers} layers at {vision.image_size} px ({(vision.image_size // vision.patch_size) ** 2} "
             f"image tokens); random weights. PyTorch {torch.__version__} fp32 (TorchLlava, KV-cached greedy), "
             f"factedge mmproj f16. threads {args.threads}, {args.n_predict} new tokens, medians of {args.reps} "
             "interleaved runs.", "",
             "| runtime | image encode ms | prompt ms | prompt tokens | prompt tok/s | gen tok/s | "
             "speed-up encode | speed-up prompt | speed-up gen |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| PyTorch fp32 | {t['encode_s'] * 1e3:.0f} | {t['prompt_s'] * 1e3:.0f} | "
             f"{runs['torch'][0]['prompt_tokens']} | {t['prompt_tps']:.1f} | {t['gen_tps']:.1f} | 1.00 | 1.00 | 1.00 |"]
    for q in QUANTS_TORCH:
        f = {k: _median([r[k] for r in runs[q]]) for k in ("encode_s", "prompt_s", "prompt_tps", "gen_tps")}
        lines.append(f"| factedge {q} | {f['encode_s'] * 1e3:.0f} | {f['prompt_s'] * 1e3:.0f} | "
                     f"{runs[q][0]['prompt_tokens']} | {f['prompt_tps']:.1f} | {f['gen_tps']:.1f} | "
                     f"{t['encode_s'] / f['encode_s']:.2f} | {t['prompt_s'] / f['prompt_s']:.2f} | "
                     f"{f['gen_tps'] / t['gen_tps']:.2f} |")
    lines += ["", "Speed-up = PyTorch time / factedge time (>1: factedge faster). factedge's prompt time "
              "excludes the image encode (timed apart), PyTorch's too; PyTorch's gen tok/s counts the "
              f"{args.n_predict - 1} decode steps after the prefill."]
    return "\n".join(lines)


def bench_quants(args, out: Path) -> str:
    bundle = args.bundle or ensure_bundle("1b", ONE_B, args.quants, out, args.threads)[1]
    text, vision = ONE_B
    image = make_image(vision.image_size, out / f"image_{vision.image_size}.png")
    quants = [q for q in args.quants]
    marker = out / "edge-1b" / ".built.json"
    rec = json.loads(marker.read_text()) if marker.is_file() else None
    runs: dict[str, list[dict]] = {q: [] for q in quants}
    for rep in range(args.reps + 1):  # rep 0 is the warm-up (page faults of a fresh mmap), not counted
        for q in quants:  # one model open at a time: a 1B f16 + 4 quants would not all stay in page cache
            chat = open_chat(bundle, q, args)
            r = run_factedge(chat, image, args)
            chat.close()
            print(rep, q, r, file=sys.stderr, flush=True)
            if rep:
                runs[q].append(r)
    n_params = sum(__import__("math").prod(s) for s in
                   __import__("factedge.convert.shapes", fromlist=["lm_shapes"]).lm_shapes(text).values())
    lines = [f"Model: LLaMA hidden {text.hidden_size}, inter {text.intermediate_size}, {text.num_layers} layers, "
             f"vocab {text.vocab_size} ({n_params / 1e9:.2f}B parameters); CLIP ViT-L/14 (hidden "
             f"{vision.hidden_size} x {vision.num_layers} layers, {vision.num_heads} heads) at {vision.image_size} px "
             f"-> {(vision.image_size // vision.patch_size) ** 2} image tokens, mmproj f16 "
             f"({(bundle / 'mmproj-f16.gguf').stat().st_size / MIB:.0f} MiB); random weights. "
             + (f"Build {rec['build_s']:.0f} s, convert (f16 + quants, verify off) {rec['convert_s']:.0f} s. " if rec else "")
             + f"threads {args.threads}, {args.n_predict} new tokens (greedy), medians of {args.reps} runs "
             "after a warm-up, quants interleaved.", "",
             "| quant | LM file MiB | image encode ms | prompt tokens | prompt tok/s | first token s | gen tok/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for q in quants:
        m = {k: _median([r[k] for r in runs[q]]) for k in ("encode_s", "prompt_tps", "gen_tps")}
        first = _median([r["encode_s"] + r["prompt_s"] for r in runs[q]])  # image + prefill: the first token's wait
        size = (bundle / f"model-{q}.gguf").stat().st_size / MIB
        lines.append(f"| {q} | {size:.0f} | {m['encode_s'] * 1e3:.0f} | {runs[q][0]['prompt_tokens']} | "
                     f"{m['prompt_tps']:.1f} | {first:.1f} | {m['gen_tps']:.1f} |")
    if not any(q.upper() == "F16" for q in quants):
        lines.append(f"| (f16, not timed) | {(bundle / 'model-f16.gguf').stat().st_size / MIB:.0f} | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["torch", "quants", "build"], action="append",
                   help="torch: factedge vs PyTorch; quants: 1B tokens/s per quant; build: only build/convert")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--n-predict", type=int, default=32)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--quants", type=lambda s: s.split(","), default=QUANTS_1B, help="for --part quants")
    p.add_argument("--bundle", type=Path, help="for --part quants: use this folder's model-<quant>.gguf files")
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = args.part or ["torch", "quants"]
    if "build" in parts:
        ensure_bundle("1b", ONE_B, args.quants, args.out, args.threads)
    if "torch" in parts:
        print("### factedge vs PyTorch (CPU)\n\n" + bench_torch(args, args.out) + "\n", flush=True)
    if "quants" in parts:
        print("### ~1B LLaMA + ViT-L/14: tokens/s per quant\n\n" + bench_quants(args, args.out) + "\n", flush=True)


if __name__ == "__main__":
    main()
