"""GPU (CUDA) check and speed (issue #3): does `n_gpu_layers=-1` give the CPU's answers, and how fast is it?

Why: factedge ships a CUDA backend switch (FACTEDGE_BACKEND=cuda) that CI, having no GPU, never runs.
This script, run on a CUDA machine against the CUDA build, checks it end to end and measures it:
- parity: one tiny f32 bundle, CPU (a child with CUDA_VISIBLE_DEVICES='') vs all layers and the
  mmproj on the GPU, through factedge's runtime (image embeddings, logits at every prompt position,
  32 greedy tokens) and through llama-mtmd-cli (-ngl 0 vs -ngl 99, --temp 0);
- build7b / quantize: a random-weight LLaMA-7B-shaped LM with a CLIP ViT-L/14-224 mmproj in the
  LLaVA-RLHF layout, written by `train.tiny.build_tiny` and converted by factedge (f16, then Q8_0, Q4_K_M);
- speed: image encode ms, prompt and generation tokens/s per file with everything on the GPU, from
  factedge's VisionModel stats and from llama-mtmd-cli's own perf lines.

    python -m bench.speed.gpu --part tiny --work W            # tiny LLaVA-RLHF checkpoint -> f32 bundle W/tiny
    python -m bench.speed.gpu --part parity --bundle W/tiny
    python -m bench.speed.gpu --part speed --bundle W/tiny --quants F32
    python -m bench.speed.gpu --part build7b --work W         # ~28 GB of disk at the peak
    python -m bench.speed.gpu --part random7b --work W --quants Q8_0,Q4_K_M   # the same shapes written directly
    python -m bench.speed.gpu --part quantize --bundle W/b7/bundle --quants Q8_0,Q4_K_M
    python -m bench.speed.gpu --part speed --bundle W/b7/bundle --quants F16,Q8_0,Q4_K_M
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.speed.edge_speed import ENC_LINE, EVAL_LINE, PROMPT_LINE, make_image  # the CPU bench's parsing

QUESTION = "What is shown in this image? Describe it briefly."
# LLaMA-7B (Vicuna-7B) text tower and CLIP ViT-L/14 at 224 px, as LLaVA-RLHF-7b-v1.5-224 has them
SEVEN_B = dict(text=(32000, 4096, 11008, 32, 32, 32), vision=(224, 14, 1024, 4096, 24, 16))
SMOKE = dict(text=(32000, 256, 512, 2, 4, 4), vision=(224, 14, 64, 128, 3, 4))  # the same code path, tiny
# per mode: (n_gpu_layers, mmproj on GPU, flash attention, KV type); "exact" = the settings verify uses
MODES = {"cpu": (0, False, False, "f32"), "gpu": (-1, True, False, "f32"), "gpu-default": (-1, True, None, "f16")}


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _files(bundle: Path, quant: str) -> tuple[Path, Path]:
    """(model, mmproj) of a bundle folder; the mmproj is the most precise one present."""
    name = quant.lower() if quant.upper() in ("F32", "F16", "BF16") else quant.upper()
    model = bundle / f"model-{name}.gguf"
    mmproj = next((bundle / f"mmproj-{t}.gguf" for t in ("f32", "f16", "q8_0") if (bundle / f"mmproj-{t}.gguf").is_file()),
                  None)
    if not model.is_file() or mmproj is None:
        raise SystemExit(f"{bundle}: no model-{name}.gguf or no mmproj")
    return model, mmproj


def _image_size(mmproj: Path) -> int:
    from factedge.edge.vision_model import mmproj_image_size

    return mmproj_image_size(mmproj)


# -- building ---------------------------------------------------------------------------------------

def part_tiny(args) -> None:
    """The shared tiny LLaVA-RLHF shapes (LoRA merged), LM and mmproj in f32: the parity bundle."""
    from factedge.convert.bundle import ConvertOptions, convert_checkpoint
    from factedge.train.base.tiny import build_tiny

    work = Path(args.work)
    root = build_tiny("llava-rlhf", work / "tiny-ckpt", seed=0)
    convert_checkpoint(Path(root), work / "tiny", ConvertOptions(base_type="f32", quants=[], mmproj_types=["f32"],
                                                                 verify=False, overwrite=True))
    print(f"tiny bundle: {work / 'tiny'}", flush=True)


def part_build7b(args) -> None:
    """Random 7B-shaped LLaVA-RLHF checkpoint (bf16 sft_model + LoRA + CLIP) -> f16 LM + f16 mmproj.

    The checkpoint is deleted once converted (disk); quantizing is its own part because it needs the
    native build, which this part does not (it can run while llama.cpp compiles)."""
    from factedge.convert.bundle import ConvertOptions, convert_checkpoint
    from factedge.convert.specs import TextSpec, VisionSpec
    from factedge.train.base.tiny import build_tiny

    shape = SMOKE if args.smoke else SEVEN_B
    text, vision = TextSpec(*shape["text"]), VisionSpec(*shape["vision"])
    work = Path(args.work) / "b7"
    t0 = time.perf_counter()
    root = build_tiny("llava-rlhf", work / "ckpt", text=text, vision=vision, seed=0)
    t1 = time.perf_counter()
    ckpt_bytes = sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())
    print(f"build7b: checkpoint {ckpt_bytes / 2**30:.2f} GiB written in {t1 - t0:.1f} s", flush=True)
    convert_checkpoint(Path(root), work / "bundle", ConvertOptions(quants=[], mmproj_types=["f16"], verify=False,
                                                                   overwrite=True, threads=args.threads))
    t2 = time.perf_counter()
    sizes = {p.name: round(p.stat().st_size / 2**30, 2) for p in (work / "bundle").glob("*.gguf")}
    print(f"build7b: converted (LoRA merged, f16 LM + f16 mmproj) in {t2 - t1:.1f} s: {sizes} GiB", flush=True)
    shutil.rmtree(work / "ckpt", ignore_errors=True)
    (work / "times.json").write_text(json.dumps({"build_s": t1 - t0, "convert_f16_s": t2 - t1,
                                                 "ckpt_gib": ckpt_bytes / 2**30}))


def part_random7b(args) -> None:
    """The 7B-shaped LM (f16) and CLIP-L/14 mmproj (f16) written straight from random tensors: the
    tiny checkpoint supplies the real vocab and layout, each tensor is drawn when its turn comes to be
    written (no 14 GB checkpoint on disk, no conversion pass), then Q8_0 and Q4_K_M by libllama."""
    import dataclasses

    import torch

    from factedge.convert.language_model import write_language_model
    from factedge.convert.layouts import load_checkpoint
    from factedge.convert.mmproj import write_mmproj
    from factedge.convert.quantize import quantize_language_model
    from factedge.convert.shapes import lm_shapes, projector_shapes, vision_shapes
    from factedge.convert.specs import VisionSpec
    from factedge.train.base.tiny_cache import cached_tiny

    shape = SMOKE if args.smoke else SEVEN_B
    base = load_checkpoint(cached_tiny("llava-rlhf", image_size=224).root)
    text = dataclasses.replace(base.text, **{f: v for f, v in zip(
        ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"), shape["text"])})
    v = VisionSpec(*shape["vision"])
    vision = dataclasses.replace(base.vision, image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
                                 intermediate_size=v.intermediate_size, num_layers=v.num_layers, num_heads=v.num_heads)

    def random(shapes):
        def draw(s):
            return torch.ones(s) if len(s) == 1 and s[0] > 1 else torch.empty(s).normal_(0.0, 0.02)
        return lambda: ((name, (lambda s=s: draw(s))) for name, s in shapes.items())

    ckpt = dataclasses.replace(base, text=text, vision=vision, adapter_dir=None,
                               _lm=random(lm_shapes(text)), _vision=random(vision_shapes(vision)),
                               _projector=random(projector_shapes(base.projector_type, vision.hidden_size, text.hidden_size)))
    out = Path(args.work) / "b7" / "bundle"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    write_language_model(ckpt, out / "model-f16.gguf", ftype="f16")
    t1 = time.perf_counter()
    write_mmproj(ckpt, out / "mmproj-f16.gguf", ftype="f16")
    t2 = time.perf_counter()
    print(f"random7b: f16 LM {(out / 'model-f16.gguf').stat().st_size / 2**30:.2f} GiB in {t1 - t0:.0f} s, "
          f"f16 mmproj {(out / 'mmproj-f16.gguf').stat().st_size / 2**30:.2f} GiB in {t2 - t1:.0f} s", flush=True)
    for quant in args.quants.split(","):
        if quant.upper() in ("F16", "F32"):
            continue
        t = time.perf_counter()
        quantize_language_model(out / "model-f16.gguf", out / f"model-{quant}.gguf", quant, threads=args.threads or None)
        print(f"random7b: {quant} in {time.perf_counter() - t:.0f} s, "
              f"{(out / f'model-{quant}.gguf').stat().st_size / 2**30:.2f} GiB", flush=True)


def part_quantize(args) -> None:
    from factedge.convert.quantize import quantize_language_model

    bundle = Path(args.bundle)
    for quant in args.quants.split(","):
        t0 = time.perf_counter()
        out = quantize_language_model(bundle / "model-f16.gguf", bundle / f"model-{quant}.gguf", quant,
                                      threads=args.threads or None)
        print(f"quantize {quant}: {time.perf_counter() - t0:.1f} s, {out.stat().st_size / 2**30:.2f} GiB", flush=True)


# -- parity: CPU vs GPU -------------------------------------------------------------------------------

def child_run(args) -> None:
    """One mode in its own process (so CUDA_VISIBLE_DEVICES='' really means CPU only)."""
    from factedge.edge.image import load_image, prepare_image
    from factedge.edge.prompt import prompt_pieces, single_turn
    from factedge.edge.image_encoder import ImageEncoder
    from factedge.edge.runtime import Context, ContextOptions, Model

    ngl, mm_gpu, fa, kv = MODES[args.child]
    model_path, mmproj_path = _files(Path(args.bundle), args.quants)
    with Model(model_path, n_gpu_layers=ngl) as model, \
            ImageEncoder(mmproj_path, model, use_gpu=mm_gpu, flash_attn=fa) as enc, \
            Context(model, ContextOptions(n_ctx=1024, n_batch=512, kv_type=kv, flash_attn=fa)) as ctx:
        pixels = prepare_image(load_image(Path(args.image)), _image_size(mmproj_path))
        emb = enc.encode(pixels)
        pieces = prompt_pieces(single_turn(QUESTION, n_images=1), model.tokenize)
        segments = [emb if p is None else p for p in pieces]
        logits = ctx.feed(segments, all_logits=True)
        ctx.reset()
        greedy = ctx.greedy(segments, args.n_predict, stop_at_eog=False)
    np.savez(args.out, emb=emb, logits=logits, greedy=np.array(greedy))


def _child(mode: str, bundle: Path, image: Path, args, out: Path) -> dict:
    env = dict(os.environ)
    if mode == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "bench.speed.gpu", "--child", mode, "--bundle", str(bundle), "--image", str(image),
           "--quants", args.quants.split(",")[0], "--n-predict", str(args.n_predict), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"child {mode} failed: {proc.stderr[-2000:]}")
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def _compare(ref: dict, got: dict) -> dict:
    e1, e2 = ref["emb"].astype(np.float64), got["emb"].astype(np.float64)
    cos = (e1 * e2).sum(1) / (np.linalg.norm(e1, axis=1) * np.linalg.norm(e2, axis=1))
    l1, l2 = ref["logits"].astype(np.float64), got["logits"].astype(np.float64)
    g1, g2 = list(ref["greedy"]), list(got["greedy"])
    first = next((i for i, (a, b) in enumerate(zip(g1, g2)) if a != b), min(len(g1), len(g2)))
    return {"emb_max_abs": float(np.abs(e1 - e2).max()), "emb_min_cos": float(cos.min()),
            "logit_max_abs": float(np.abs(l1 - l2).max()), "logit_std": float(l1.std()),
            "top1": float((l1.argmax(1) == l2.argmax(1)).mean()), "positions": int(l1.shape[0]),
            "greedy_equal": sum(a == b for a, b in zip(g1, g2)), "greedy_n": len(g1), "greedy_prefix": first}


def _mtmd(model: Path, mmproj: Path, image: Path, ngl: int, n_predict: int, extra: list[str],
          cpu_only: bool = False) -> tuple[str, str]:
    from factedge.edge.native import tool

    env = dict(os.environ)
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [str(tool("llama-mtmd-cli")), "-m", str(model), "--mmproj", str(mmproj), "--image", str(image),
           "-p", f"<__media__>\n{QUESTION}", "--jinja", "--temp", "0", "-n", str(n_predict), "-c", "2048",
           "-ngl", str(ngl), "--perf", "-v", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-mtmd-cli -ngl {ngl} failed ({proc.returncode}): {(proc.stderr + proc.stdout)[-1500:]}")
    return proc.stdout, proc.stderr + proc.stdout


def part_parity(args) -> None:
    bundle = Path(args.bundle)
    model, mmproj = _files(bundle, args.quants.split(",")[0])
    image = make_image(_image_size(mmproj), Path(args.work) / "parity.png")
    runs = {m: _child(m, bundle, image, args, Path(args.work) / f"parity-{m}.npz") for m in MODES}
    print(f"### CPU vs GPU parity ({model.name} + {mmproj.name}, prompt with one image, {args.n_predict} greedy tokens)\n")
    print("| run vs CPU (fa off, KV f32) | emb max abs | emb min cos | logits max abs (logit std) | top-1 agree | greedy equal | first diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode in ("gpu", "gpu-default"):
        c = _compare(runs["cpu"], runs[mode])
        label = {"gpu": "GPU, fa off, KV f32", "gpu-default": "GPU, fa auto, KV f16 (defaults)"}[mode]
        print(f"| {label} | {c['emb_max_abs']:.2e} | {c['emb_min_cos']:.7f} | {c['logit_max_abs']:.2e} ({c['logit_std']:.2f}) "
              f"| {c['top1']:.2%} of {c['positions']} | {c['greedy_equal']}/{c['greedy_n']} | "
              f"{c['greedy_prefix'] if c['greedy_prefix'] < c['greedy_n'] else '-'} |")
    from factedge.edge.errors import NativeError
    from factedge.edge.native import tool

    try:
        tool("llama-mtmd-cli")
    except NativeError:
        print("\n(llama-mtmd-cli not built: the native CLI's CPU-vs-GPU check is skipped)", flush=True)
        return
    exact = ["-fa", "off", "-ctk", "f32", "-ctv", "f32"]
    cpu_text, _ = _mtmd(model, mmproj, image, 0, args.n_predict, exact, cpu_only=True)
    gpu_text, gpu_log = _mtmd(model, mmproj, image, 99, args.n_predict, exact)
    offloaded = next((line.strip() for line in gpu_log.splitlines() if "offloaded" in line and "layers" in line), "?")
    print(f"\nllama-mtmd-cli --temp 0 -n {args.n_predict} -fa off -ctk/-ctv f32: -ngl 0 (no GPU visible) vs -ngl 99 "
          f"({offloaded}): output {'IDENTICAL' if cpu_text == gpu_text else 'DIFFERENT'}")
    print(f"  cpu: {cpu_text.strip()[:200]!r}\n  gpu: {gpu_text.strip()[:200]!r}\n", flush=True)


# -- speed ------------------------------------------------------------------------------------------

def _factedge_speed(model: Path, mmproj: Path, image: Path, args) -> dict:
    from factedge.edge.sampling import SamplingOptions
    from factedge.edge.vision_model import ModelOptions, VisionModel

    opts = ModelOptions(n_ctx=2048, n_gpu_layers=-1, mmproj_on_gpu=True,
                       sampling=SamplingOptions(max_tokens=args.n_predict))
    from factedge.edge.chat import ChatSession, SessionOptions

    with VisionModel.open(model=model, mmproj=mmproj, options=opts) as vision, \
            ChatSession(vision, SessionOptions(n_ctx=2048, image_cache=0)) as chat:
        chat.ask(QUESTION, image)  # warm-up: CUDA kernels, cuBLAS handles, first touch of the weights
        runs, counters = [], []
        for _ in range(args.reps):
            chat.reset()  # a fresh one-turn chat each time, as `factedge ask`
            chat.ctx.perf(reset=True)
            runs.append(chat.ask(QUESTION, image).stats)
            counters.append(chat.ctx.perf())  # llama.cpp's own timers for the same decodes
        load_s = vision.load_s
    return {"load_s": load_s, "encode_ms": _median([s.image_encode_s * 1e3 for s in runs]),
            "prompt_tokens": runs[0].prompt_tokens, "prompt_tps": _median([s.prompt_tps for s in runs]),
            "gen_tokens": runs[0].generated_tokens, "gen_tps": _median([s.generate_tps for s in runs]),
            "llama_eval_tps": _median([c["n_eval"] / c["eval_ms"] * 1e3 for c in counters if c["eval_ms"]])}


def _native_speed(model: Path, mmproj: Path, image: Path, args) -> dict:
    runs = []
    for _ in range(args.native_reps):
        _, log = _mtmd(model, mmproj, image, 99, args.n_predict, ["--ignore-eos"])
        enc, p, e = ENC_LINE.findall(log), PROMPT_LINE.search(log), EVAL_LINE.search(log)
        if not (enc and p and e):
            raise RuntimeError(f"could not parse llama-mtmd-cli timings: {log[-800:]}")
        runs.append({"encode_ms": float(enc[0]), "prompt_tokens": int(p.group(2)),
                     "prompt_tps": int(p.group(2)) / float(p.group(1)) * 1e3,
                     "gen_tokens": int(e.group(2)), "gen_tps": int(e.group(2)) / float(e.group(1)) * 1e3})
    return {k: (_median([r[k] for r in runs]) if isinstance(runs[0][k], float) else runs[0][k]) for k in runs[0]}


def part_speed(args) -> None:
    bundle = Path(args.bundle)
    rows = []
    for quant in args.quants.split(","):
        model, mmproj = _files(bundle, quant)
        image = make_image(_image_size(mmproj), Path(args.work) / "speed.png")
        fe = _factedge_speed(model, mmproj, image, args) if args.reps else None
        nat = _native_speed(model, mmproj, image, args) if args.native_reps else None
        rows.append((quant, model.stat().st_size / 2**30, mmproj.name, fe, nat))
        print(json.dumps({"quant": quant, "factedge": fe, "native": nat}), flush=True)
    print(f"\n### Speed, all layers + mmproj on the GPU ({bundle.name}; {args.n_predict} new tokens, greedy; "
          f"factedge medians of {args.reps} after a warm-up, llama-mtmd-cli medians of {args.native_reps})\n")
    print("| file | GiB | runtime | load s | image encode ms | prompt tokens | prompt tok/s | gen tokens | gen tok/s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for quant, gib, mm, fe, nat in rows:
        if fe:
            print(f"| {quant} + {mm} | {gib:.2f} | factedge VisionModel | {fe['load_s']:.1f} | {fe['encode_ms']:.1f} | "
                  f"{fe['prompt_tokens']} | {fe['prompt_tps']:.0f} | {fe['gen_tokens']} | {fe['gen_tps']:.1f} |")
            print(f"| {quant} + {mm} | {gib:.2f} | same decodes, llama.cpp's own eval counter | | | | | "
                  f"| {fe['llama_eval_tps']:.1f} |")
        if nat:
            print(f"| {quant} + {mm} | {gib:.2f} | llama-mtmd-cli -ngl 99 | | {nat['encode_ms']:.1f} | "
                  f"{nat['prompt_tokens']} | {nat['prompt_tps']:.0f} | {nat['gen_tokens']} | {nat['gen_tps']:.1f} |")
    print(flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["tiny", "parity", "build7b", "random7b", "quantize", "speed"])
    p.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--image", help=argparse.SUPPRESS)
    p.add_argument("--bundle")
    p.add_argument("--work", default="/tmp/factedge_gpu")
    p.add_argument("--quants", default="F32", help="comma-separated model files of the bundle (F32, F16, Q8_0, ...)")
    p.add_argument("--n-predict", type=int, default=32)
    p.add_argument("--reps", type=int, default=3, help="factedge VisionModel runs per file (0: none)")
    p.add_argument("--native-reps", type=int, default=1, help="llama-mtmd-cli runs per file (0: none)")
    p.add_argument("--threads", type=int, default=0, help="for conversion and llama-quantize (0: all cores)")
    p.add_argument("--smoke", action="store_true", help="build7b with tiny shapes (checks the path, not the speed)")
    args = p.parse_args(argv)
    if args.child:
        child_run(args)
        return
    Path(args.work).mkdir(parents=True, exist_ok=True)
    {"tiny": part_tiny, "parity": part_parity, "build7b": part_build7b, "random7b": part_random7b,
     "quantize": part_quantize, "speed": part_speed}[args.part](args)


if __name__ == "__main__":
    main()
