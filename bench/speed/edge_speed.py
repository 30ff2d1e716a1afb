"""Edge speed and memory (issue #3): factedge vs llama.cpp's own CLI and llama-cpp-python, on one GGUF.

Why: factedge drives llama.cpp through ctypes; this shows what that costs against the native
`llama-mtmd-cli` (same file, same threads, same prompt), what KV-prefix reuse buys on a second turn
about the same image (vs llama-cpp-python's Llava15ChatHandler), and that a chat process's peak RSS
stays near the mmap'd file sizes. Each comparison is interleaved in one run (shared, noisy machine);
medians are reported.

    python -m bench.speed.edge_speed --bundle BUNDLE --threads 2 --reps 3 --n-predict 32
    python -m bench.speed.edge_speed --threads 2          # builds the tiny llava-hf bundle (336 px) first
"""
from __future__ import annotations

import argparse
import base64
import io
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

QUESTION = "What is shown in this image? Describe it briefly."


@dataclass
class Files:
    model: Path
    mmproj: Path
    image_size: int


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def make_image(size: int, path: Path) -> Path:
    """A deterministic picture already at the model's size (no resize cost on either side)."""
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([(x * 255 // size), (y * 255 // size), ((x + y) * 127 // size)], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def resolve_files(args) -> Files:
    from factedge.edge.bundle import open_bundle
    from factedge.edge.vision_model import mmproj_image_size

    bundle = Path(args.bundle) if args.bundle else build_bundle(Path(args.scratch))
    files = open_bundle(bundle, quant=args.quant)
    return Files(files.model, files.mmproj, mmproj_image_size(files.mmproj))


def build_bundle(scratch: Path) -> Path:
    from factedge.convert.bundle import ConvertOptions, convert_checkpoint
    from factedge.train.base.tiny_cache import cached_tiny

    out = scratch / "bundle_tiny336"
    if not (out / "manifest.json").is_file():
        ckpt = cached_tiny("llava-hf", image_size=336)
        convert_checkpoint(Path(ckpt.root), out,
                           ConvertOptions(quants=["Q8_0", "Q4_K_M"], verify=False))
    return out


# -- 1. native CLI vs VisionModel -----------------------------------------------------------------

ENC_LINE = re.compile(r"(?:slice encoded in|encoding done in)\s+(\d+)\s*ms")
PROMPT_LINE = re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
EVAL_LINE = re.compile(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs")


def run_native(files: Files, image: Path, args) -> dict:
    from factedge.edge.native import tool

    cmd = [str(tool("llama-mtmd-cli")), "-m", str(files.model), "--mmproj", str(files.mmproj),
           "--image", str(image), "-p", f"<__media__>\n{args.question}", "--jinja", "--temp", "0",
           "-n", str(args.n_predict), "-t", str(args.threads), "-c", str(args.n_ctx), "--perf", "-v"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = proc.stderr + proc.stdout
    if proc.returncode != 0:
        raise RuntimeError(f"llama-mtmd-cli failed ({proc.returncode}): {log[-800:]}")
    enc = [int(m) for m in ENC_LINE.findall(log)]
    p, e = PROMPT_LINE.search(log), EVAL_LINE.search(log)
    if not (enc and p and e):
        raise RuntimeError(f"could not parse llama-mtmd-cli timings: {log[-800:]}")
    # prompt eval (llama_perf) counts text batches and the image embedding batch alike
    return {"encode_ms": float(enc[0]), "prompt_tokens": int(p.group(2)),
            "prompt_tps": int(p.group(2)) / float(p.group(1)) * 1e3,
            "gen_tokens": int(e.group(2)), "gen_tps": int(e.group(2)) / float(e.group(1)) * 1e3 if float(e.group(1)) else 0.0}


def run_factedge(session, image: Path, args) -> dict:
    """One fresh one-turn chat (history reset, no image kept: what `factedge ask` does), timed on
    llama.cpp's own counters for its decodes and on the wall clock."""
    from factedge.edge.sampling import SamplingOptions

    session.reset()
    session.ctx.perf(reset=True)
    ans = session.ask(args.question, image, SamplingOptions(max_tokens=args.n_predict))
    s, perf = ans.stats, session.ctx.perf()
    return {"encode_ms": s.image_encode_s * 1e3, "prompt_tokens": s.prompt_tokens,
            "prompt_tps": s.prompt_tokens / s.prompt_s, "gen_tokens": s.generated_tokens,
            "gen_tps": perf["n_eval"] / perf["eval_ms"] * 1e3 if perf["eval_ms"] else 0.0,
            "gen_wall_tps": s.generated_tokens / s.generate_s if s.generate_s else 0.0}


def bench_vs_native(files: Files, image: Path, args) -> str:
    from factedge.edge.vision_model import ModelOptions, VisionModel

    from factedge.edge.chat import ChatSession, SessionOptions

    vision = VisionModel.open(model=files.model, mmproj=files.mmproj,
                              options=ModelOptions(n_ctx=args.n_ctx, threads=args.threads))
    session = ChatSession(vision, SessionOptions(n_ctx=args.n_ctx, image_cache=0))
    run_factedge(session, image, args)  # warm-up: first-touch page faults of the mmap'd weights
    nat, fe = [], []
    for _ in range(args.reps):  # interleaved: both sides see the same machine load
        nat.append(run_native(files, image, args))
        fe.append(run_factedge(session, image, args))
    session.close()
    vision.close()
    rows = ["| metric | llama-mtmd-cli | factedge | factedge/native |", "|---|---:|---:|---:|"]
    for key, label, better_low in (("encode_ms", "image encode ms", True),
                                   ("prompt_tps", "prompt eval tokens/s", False),
                                   ("gen_tps", "generation tokens/s (decode, llama_perf)", False)):
        n, f = _median([r[key] for r in nat]), _median([r[key] for r in fe])
        rows.append(f"| {label} | {n:.1f} | {f:.1f} | {_ratio(f, n)} |")
    wall = _median([r["gen_wall_tps"] for r in fe])
    rows.append(f"| generation tokens/s (factedge wall: sampling, text, Python) | | {wall:.1f} | "
                f"{_ratio(wall, _median([r['gen_tps'] for r in nat]))} |")
    rows.append(f"| prompt tokens (incl. image) | {nat[0]['prompt_tokens']} | {fe[0]['prompt_tokens']} | |")
    rows.append(f"| generated tokens | {nat[0]['gen_tokens']} | {fe[0]['gen_tokens']} | |")
    note = ("\nOverhead ratio: time-like metric (encode ms) >1 means factedge slower; rate metrics "
            "(tokens/s) <1 means factedge slower. Native prompt eval counts text + image positions "
            "(llama_perf); factedge's prompt_tokens = positions fed. Generation: both sides' decode "
            "time from llama.cpp's own counter (llama_perf eval), then factedge's wall time per token, "
            "which also pays sampling, detokenising and Python (native's wall per token is not reported "
            "by the CLI). Medians of "
            f"{args.reps} interleaved runs; native includes its own process start (not in the rates).")
    return "\n".join(rows) + "\n" + note


# -- 2. second turn: KV prefix reuse vs llama-cpp-python -----------------------------------------

def _first_piece(stream) -> float:
    start = time.perf_counter()
    for piece in stream:
        if piece:
            break
    return time.perf_counter() - start


def factedge_two_turns(files: Files, image: Path, args) -> tuple[float, float, dict]:
    from factedge.edge.chat import ChatSession, SessionOptions
    from factedge.edge.sampling import SamplingOptions
    from factedge.edge.vision_model import ModelOptions, VisionModel

    vision = VisionModel.open(model=files.model, mmproj=files.mmproj,
                             options=ModelOptions(n_ctx=args.n_ctx, threads=args.threads))
    sess = ChatSession(vision, SessionOptions(n_ctx=args.n_ctx, sampling=SamplingOptions(max_tokens=args.n_predict)))
    times = []
    for text, img in ((args.question, image), ("And what colours does it have?", None)):
        start = time.perf_counter()
        stream = sess.stream(text, img)
        _first_piece(stream)
        times.append(time.perf_counter() - start)
        for _ in stream:
            pass
    st = sess.turns[-1].stats
    info = {"reused": st.prompt_reused, "evaluated": st.prompt_tokens, "images_encoded": st.images_encoded}
    sess.close()
    vision.close()
    return times[0], times[1], info


def lcp_two_turns(files: Files, image: Path, args, llama_cpp) -> tuple[float, float]:
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    handler = Llava15ChatHandler(clip_model_path=str(files.mmproj), verbose=False)
    llm = llama_cpp.Llama(model_path=str(files.model), chat_handler=handler, n_ctx=args.n_ctx,
                          n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    buf = io.BytesIO()
    Image.open(image).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                             {"type": "text", "text": args.question}]}]
    times = []
    for follow in (None, "And what colours does it have?"):
        if follow:
            messages.append({"role": "user", "content": follow})
        start = time.perf_counter()
        chunks = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=args.n_predict,
                                            stream=True)
        answer = ""
        for chunk in chunks:
            piece = chunk["choices"][0]["delta"].get("content")
            if piece and len(times) < len(messages) and not answer:
                times.append(time.perf_counter() - start)
            answer += piece or ""
        if len(times) < len(messages):
            times.append(time.perf_counter() - start)  # nothing generated: time to the end
        messages.append({"role": "assistant", "content": answer})
    llm.close()
    return times[0], times[1]


def bench_second_turn(files: Files, image: Path, args) -> str:
    from factedge.edge.errors import FactedgeError
    from factedge.edge.native import load_llama_cpp

    llama_cpp, lcp_error = None, None
    try:
        llama_cpp = load_llama_cpp()
    except (ImportError, OSError, RuntimeError, FactedgeError) as exc:  # a result to report, not a crash
        lcp_error = f"{type(exc).__name__}: {exc}"
    fe, lcp, info = [], [], {}
    for _ in range(args.reps):
        t1, t2, info = factedge_two_turns(files, image, args)
        fe.append((t1, t2))
        if llama_cpp is not None and lcp_error is None:
            try:
                lcp.append(lcp_two_turns(files, image, args, llama_cpp))
            except (OSError, RuntimeError, ValueError, TypeError, KeyError) as exc:  # reported in the table
                lcp_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    rows = ["| runtime | TTFT turn 1 ms | TTFT turn 2 ms | turn2/turn1 |", "|---|---:|---:|---:|"]
    for name, pairs in (("factedge ChatSession", fe), ("llama-cpp-python Llava15ChatHandler", lcp)):
        if pairs:
            a, b = _median([p[0] for p in pairs]), _median([p[1] for p in pairs])
            rows.append(f"| {name} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.1%} |")
    if lcp_error:
        rows.append(f"\nllama-cpp-python could not run: `{lcp_error}`")
    rows.append(f"\nfactedge turn 2: {info.get('reused')} positions reused from the KV cache, "
                f"{info.get('evaluated')} evaluated, {info.get('images_encoded')} images encoded "
                f"(target turn2/turn1 <= 10%). Medians of {args.reps} interleaved runs, TTFT = call to "
                "first non-empty text piece.")
    return "\n".join(rows)


# -- 3. peak RSS of a chat process -----------------------------------------------------------------

CHILD = """
import sys
from factedge.edge.chat import ChatSession, SessionOptions
from factedge.edge.sampling import SamplingOptions
from factedge.edge.vision_model import ModelOptions, VisionModel
model, mmproj, image, n_ctx, threads, n = sys.argv[1:7]
if model != "-":
    v = VisionModel.open(model=model, mmproj=mmproj, options=ModelOptions(n_ctx=int(n_ctx), threads=int(threads)))
    s = ChatSession(v, SessionOptions(n_ctx=int(n_ctx), sampling=SamplingOptions(max_tokens=int(n))))
    for q, img in (("Describe the image.", image), ("What colours?", None), ("Anything else?", None)):
        s.ask(q, img)
# VmHWM, not ru_maxrss: Linux carries the parent's maxrss into a forked child, VmHWM is per address space
print([int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] / 1024)
"""


def _child_peak(argv: list[str]) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-800:])
    return float(out.stdout.strip().splitlines()[-1])


def bench_rss(files: Files, image: Path, args) -> str:
    mib = lambda p: p.stat().st_size / 2**20  # noqa: E731
    floor = _child_peak(["-", "-", "-", "0", "0", "0"])
    peak = _child_peak([str(files.model), str(files.mmproj), str(image), str(args.n_ctx), str(args.threads),
                        str(args.n_predict)])
    kv = 0.0
    from factedge.edge.inspect import describe_gguf
    meta = describe_gguf(files.model).metadata
    arch = meta.get("general.architecture", "llama")
    n_layer, n_embd = meta.get(f"{arch}.block_count"), meta.get(f"{arch}.embedding_length")
    n_head = meta.get(f"{arch}.attention.head_count")
    n_kv = meta.get(f"{arch}.attention.head_count_kv", n_head)  # absent: no GQA
    if n_layer and n_embd and n_head and n_kv:
        kv = 2 * n_layer * args.n_ctx * n_embd * n_kv / n_head * 2 / 2**20  # K and V, f16
    files_mib = mib(files.model) + mib(files.mmproj)
    rows = ["| quantity | MiB |", "|---|---:|",
            f"| model GGUF ({files.model.name}) | {mib(files.model):.1f} |",
            f"| mmproj GGUF ({files.mmproj.name}) | {mib(files.mmproj):.1f} |",
            f"| model + mmproj | {files_mib:.1f} |",
            f"| KV cache f16 at n_ctx={args.n_ctx} (computed) | {kv:.1f} |",
            f"| child interpreter + factedge.edge imports only (floor) | {floor:.1f} |",
            f"| peak RSS, 3-turn chat child | {peak:.1f} |",
            f"| peak - floor | {peak - floor:.1f} |",
            f"| (peak - floor) / (files + KV) | {_ratio(peak - floor, files_mib + kv)} |"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", help="bundle folder (default: build the tiny llava-hf 336 px one)")
    p.add_argument("--quant", default="Q4_K_M")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--n-predict", type=int, default=32)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--scratch", default=tempfile.gettempdir() + "/factedge_edge_speed")
    p.add_argument("--only", choices=["native", "turns", "rss"], action="append")
    args = p.parse_args(argv)
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    files = resolve_files(args)
    image = make_image(files.image_size, Path(args.scratch) / f"image_{files.image_size}.png")
    parts = args.only or ["native", "turns", "rss"]
    print(f"model: {files.model} ({args.quant}), mmproj: {files.mmproj}, image {files.image_size} px, "
          f"threads {args.threads}, n_predict {args.n_predict}, n_ctx {args.n_ctx}\n")
    if "native" in parts:
        print("### factedge vs llama-mtmd-cli\n\n" + bench_vs_native(files, image, args) + "\n", flush=True)
    if "turns" in parts:
        print("### Second turn on the same image (time to first token)\n\n"
              + bench_second_turn(files, image, args) + "\n", flush=True)
    if "rss" in parts:
        print("### Peak RSS of a chat process vs mmap'd files\n\n" + bench_rss(files, image, args) + "\n",
              flush=True)


if __name__ == "__main__":
    main()
