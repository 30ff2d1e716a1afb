"""Many questions through one model (issue #19): the batch engine vs one question at a time, and vs
llama.cpp's own server with `--parallel N` on the same files.

Why: decoding is memory-bound on a laptop CPU, so a step that reads the weights once for 8 sequences
costs little more than one for a single sequence. This measures what that buys end to end — questions
per minute and aggregate generated tokens/s for the whole set (image encodes, prompts and decoding
included) — and checks that every batched answer is the serial one token for token.

    python -m bench.speed.batch_speed --threads 2 --parallel 1,2,4,8 --questions 16 --n-predict 32 \
        [--bundle DIR --quant Q4_K_M] [--server PATH/TO/llama-server]

Without --bundle, the ~1B LLaMA + CLIP ViT-L/14 bundle of edge_vs_torch (random weights, Q4_K_M) is
built once and cached. Serial = one ChatSession answering each question from a fresh prompt (images
cached: the fastest one-at-a-time path with the same numerics). The runs are interleaved in one
process, so the ratios are side by side on the same machine state.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import ROOT, ensure_factedge

QUESTIONS = ("What is shown in this image? Describe it briefly.", "What colours do you see?",
             "Is there any text in the picture?", "How many objects are there?")


def questions(n: int, images: list[Path]) -> list[tuple[str, Path]]:
    return [(QUESTIONS[i % len(QUESTIONS)], images[i % len(images)]) for i in range(n)]


def make_images(folder: Path, n: int, size: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        rgb = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
        out.append(folder / f"img{i}.png")
        Image.fromarray(rgb).save(out[-1])
    return out


def run_serial(vision, items, n_predict: int) -> tuple[list, float, float]:
    from factedge.edge.chat import ChatSession, SessionOptions
    from factedge.edge.sampling import SamplingOptions

    sampling = SamplingOptions(max_tokens=n_predict)
    with ChatSession(vision, SessionOptions(n_ctx=vision.options.n_ctx, image_cache=len(items))) as chat:
        start = time.perf_counter()
        answers = []
        for q, image in items:
            chat.reset()
            answers.append(chat.ask(q, image, sampling))
        return answers, time.perf_counter() - start, sum(a.stats.generate_s for a in answers)


def run_batched(vision, items, n_predict: int, parallel: int, seq_ctx: int,
                exact: bool = True) -> tuple[list, float, float]:
    from factedge.edge.batch import BatchOptions, BatchSession, Request
    from factedge.edge.sampling import SamplingOptions

    sampling = SamplingOptions(max_tokens=n_predict)
    options = BatchOptions(parallel=parallel, seq_ctx=seq_ctx, image_cache=len(items), exact=exact)
    with BatchSession(vision, options) as batch:
        start = time.perf_counter()
        outcomes = batch.answer_all(Request(q, image, sampling) for q, image in items)
        wall = time.perf_counter() - start
    for o in outcomes:
        if o.error is not None:
            raise o.error
    return [o.answer for o in outcomes], wall, batch.stats.decode_s


def run_server(binary: Path, files, items, n_predict: int, parallel: int, seq_ctx: int,
               threads: int) -> tuple[list, float]:
    """llama-server --parallel N on the same model + mmproj, N clients at once (OpenAI chat API)."""
    from bench.speed.llama_server import LlamaServer

    with LlamaServer(binary, files.model, files.mmproj, parallel=parallel, n_ctx=parallel * seq_ctx,
                     threads=threads) as server:
        start = time.perf_counter()
        texts = server.answer_all(items, n_predict, clients=parallel)
        return texts, time.perf_counter() - start


def figures(name: str, answers, wall: float, decode_s: float | None, serial: dict | None, reference) -> dict:
    """Whole-set figures (wall clock) and decode-only ones (generated tokens / seconds of decoding)."""
    tokens = sum(len(a.tokens) for a in answers) if reference is not None else None
    same = sum(a.tokens == r.tokens for a, r in zip(answers, reference)) if reference is not None else None
    row = {"run": name, "questions": len(answers), "wall_s": round(wall, 2),
           "questions_per_min": round(60 * len(answers) / wall, 1), "generated_tokens": tokens,
           "tokens_per_s": round(tokens / wall, 2) if tokens else None,
           "decode_tokens_per_s": round(tokens / decode_s, 2) if tokens and decode_s else None,
           "identical_to_serial": same}
    serial = serial or row
    row["speedup_vs_serial"] = round(serial["wall_s"] / wall, 2)
    if row["decode_tokens_per_s"] and serial.get("decode_tokens_per_s"):
        row["decode_speedup_vs_serial"] = round(row["decode_tokens_per_s"] / serial["decode_tokens_per_s"], 2)
    return row


def main(argv: list[str] | None = None) -> None:
    ensure_factedge()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="a factedge bundle (default: the cached ~1B random bundle)")
    p.add_argument("--quant", default="Q4_K_M")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--n-predict", type=int, default=32)
    p.add_argument("--seq-ctx", type=int, default=512, help="positions per question (prompt + answer)")
    p.add_argument("--server", type=Path, help="a llama-server binary built from the same patched tree")
    p.add_argument("--json", type=Path)
    p.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench")
    args = p.parse_args(argv)

    from factedge.edge.batch import EXACT_ROWS
    from factedge.edge.vision_model import ModelOptions, VisionModel

    bundle = args.bundle
    if bundle is None:
        from bench.speed.edge_vs_torch import ONE_B, ensure_bundle

        bundle = ensure_bundle("1b", ONE_B, [args.quant], args.out, args.threads)[1]
    vision = VisionModel.open(bundle, quant=args.quant,
                              options=ModelOptions(n_ctx=args.seq_ctx, threads=args.threads))
    with vision:
        images = make_images(args.out / "batch-images", args.images, vision.image_size)
        items = questions(args.questions, images)
        run_serial(vision, items[:1], 4)  # warm-up: page the weights in, spin the thread pool up
        serial, serial_wall, serial_decode = run_serial(vision, items, args.n_predict)
        base = figures("serial", serial, serial_wall, serial_decode, None, serial)
        rows = [base]
        for n in args.parallel:
            for exact in (True, False) if n > EXACT_ROWS else (True,):
                answers, wall, decode_s = run_batched(vision, items, args.n_predict, n, args.seq_ctx, exact)
                name = f"factedge parallel {n}" + ("" if n <= EXACT_ROWS else ", exact" if exact else ", fast-batch")
                rows.append(figures(name, answers, wall, decode_s, base, serial))
            if args.server:
                texts, swall = run_server(args.server, vision.files, items, args.n_predict, n, args.seq_ctx,
                                          args.threads)
                row = figures(f"llama-server --parallel {n}", texts, swall, None, base, None)
                row["same_text_as_serial"] = sum(t == a.text for t, a in zip(texts, serial))
                rows.append(row)
    print(f"bundle {bundle} ({args.quant}), {args.questions} questions over {args.images} images, "
          f"{args.n_predict} new tokens each, {args.threads} threads")
    print("| run | questions/min | x serial | gen tokens/s, whole set | decode tokens/s | decode x serial "
          "| identical to serial |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        same = r["identical_to_serial"] if r["identical_to_serial"] is not None else r.get("same_text_as_serial")
        cell = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"| {r['run']} | {r['questions_per_min']:.1f} | {r['speedup_vs_serial']:.2f} | {cell(r['tokens_per_s'])} "
              f"| {cell(r['decode_tokens_per_s'])} | {cell(r.get('decode_speedup_vs_serial'))} | "
              f"{same}/{r['questions']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
