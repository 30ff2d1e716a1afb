"""Soak: many consecutive image turns in one process, no RSS growth, no wrong image reused (issue #3).

    export FACTEDGE_NATIVE_DIR=/path/to/factedge/_native   # the patched llama.cpp build
    python -m bench.speed.soak --turns 1000 --max-tokens 2 [--bundle DIR]

One VisionModel and one ChatSession answer `--turns` questions, each with a solid-colour image from a
palette whose cycle length changes every block of turns, so the embedding LRU both hits (short
cycles) and misses (long ones). The chat is reset after stretches of varying length, so KV prefix
reuse is exercised inside a stretch, and n_ctx is small with overflow="drop_oldest", so long
stretches drop their oldest turns. Every turn checks that the embedding the session used
(`ChatTurn.images[0].embedding`) is byte-equal to a fresh `ImageEncoder.encode` of the same pixels and
differs from every other colour's embedding. VmRSS is sampled every `--every` turns; the pass line
asks that RSS at the end is within `--bound-mib` of RSS after `--warmup` turns. Without --bundle, the
tiny llava-hf checkpoint is converted (Q8_0) in a child process, so this process never imports torch.
`run_soak` is the loop; tests/edge/test_soak.py loads this file and runs it at 60 turns.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MIB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]  # the repository (this file is also loaded by path, from the tests)

# 11 distinct colours: the cycle picks the first `period` of them (offset per block)
PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
           (255, 255, 255), (0, 0, 0), (128, 64, 32), (32, 128, 200), (200, 200, 64)]
PERIODS = (2, 7, 3, 11, 5, 9)  # colour cycle length per block; LRU holds 4, so 2/3 hit, 7/9/11 miss
STRETCHES = (1, 3, 6, 2, 8, 4, 5)  # turns between resets; n_ctx 1024 holds ~3 image turns
QUESTIONS = ("What colour is this?", "Describe it.", "Is it bright?")


@dataclass
class SoakOptions:
    turns: int = 1000
    max_tokens: int = 2
    n_ctx: int = 1024
    image_cache: int = 4
    block: int = 40  # turns per palette period
    every: int = 50  # RSS sample interval (turns)
    warmup: int = 200  # RSS baseline taken after this many turns
    bound_mib: float = 16.0
    threads: int = 1  # 2 threads on a loaded 2-core machine was 20x slower (spin-waiting)


@dataclass
class SoakResult:
    turns: int = 0
    encoded: int = 0  # cache misses (the session encoded the image)
    reused: int = 0  # cache hits
    resets: int = 0
    dropped: int = 0  # turns forgotten by drop_oldest
    prompt_reused: int = 0  # KV positions kept from the previous turn, summed
    wrong: list[str] = field(default_factory=list)  # one line per failed check
    rss: list[tuple[int, float]] = field(default_factory=list)  # (turns done, VmRSS MiB)
    seconds: float = 0.0  # the whole loop, checks included
    ask_seconds: float = 0.0  # ChatSession.ask only
    kv_mib: float = 0.0
    warmup: int = 0
    bound_mib: float = 0.0

    @property
    def rss_warm(self) -> float:
        return next(m for t, m in self.rss if t >= self.warmup)

    @property
    def growth_mib(self) -> float:
        return self.rss[-1][1] - self.rss_warm

    @property
    def passed(self) -> bool:
        return not self.wrong and self.growth_mib <= self.bound_mib


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def colour_image(colour: tuple[int, int, int]) -> np.ndarray:
    """A solid-colour RGB uint8 image (non-square, so the LLaVA padding is exercised too)."""
    return np.broadcast_to(np.array(colour, np.uint8), (48, 64, 3)).copy()


def colour_at(turn: int, block: int) -> int:
    """Palette index for a turn: cycle of PERIODS[block k] over a window of the palette."""
    k = turn // block
    period = PERIODS[k % len(PERIODS)]
    return (k + turn % period) % len(PALETTE)


def kv_cache_mib(model_path: Path, n_ctx: int, bytes_per: int = 2) -> float:
    """n_ctx * layers * kv heads * head dim * 2 (K and V) * bytes, from the GGUF header."""
    from factedge.edge.gguf_header import read_header

    meta = read_header(model_path).metadata
    arch = meta["general.architecture"]
    layers, heads = int(meta[f"{arch}.block_count"]), int(meta[f"{arch}.attention.head_count"])
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(meta[f"{arch}.embedding_length"]) // heads
    return n_ctx * layers * kv_heads * head_dim * 2 * bytes_per / MIB


def run_soak(vision, opts: SoakOptions, log=None) -> SoakResult:
    """Drive one ChatSession on `vision` for opts.turns image turns, checking every turn."""
    from factedge.edge.chat import ChatSession, SessionOptions
    from factedge.edge.image import load_image, prepare_image
    from factedge.edge.sampling import SamplingOptions

    size = vision.image_size  # the mmproj's input size, as the session prepares images
    images = [colour_image(c) for c in PALETTE]
    pixels = [prepare_image(load_image(im), size) for im in images]
    refs = [vision.encoder.encode(p) for p in pixels]  # reference embedding per colour
    for i in range(len(refs)):
        for j in range(i):
            if np.array_equal(refs[i], refs[j]):
                raise RuntimeError(f"colours {i} and {j} encode identically: the check would be blind")
    res = SoakResult(kv_mib=kv_cache_mib(vision.files.model, opts.n_ctx), warmup=min(opts.warmup, opts.turns),
                     bound_mib=opts.bound_mib)
    sampling = SamplingOptions(max_tokens=opts.max_tokens)
    session = ChatSession(vision, SessionOptions(n_ctx=opts.n_ctx, overflow="drop_oldest",
                                                 image_cache=opts.image_cache, sampling=sampling))
    stretch_i, left = 0, STRETCHES[0]
    start = time.perf_counter()
    try:
        for turn_no in range(opts.turns):
            if left == 0:
                session.reset()
                res.resets += 1
                stretch_i += 1
                left = STRETCHES[stretch_i % len(STRETCHES)]
            left -= 1
            c = colour_at(turn_no, opts.block)
            t0 = time.perf_counter()
            answer = session.ask(QUESTIONS[turn_no % len(QUESTIONS)], images[c])
            res.ask_seconds += time.perf_counter() - t0
            st = answer.stats
            res.encoded += st.images_encoded
            res.reused += st.images_reused
            res.dropped += st.dropped_turns
            res.prompt_reused += st.prompt_reused
            _check_turn(res, turn_no, c, session.turns[-1], vision.encoder.encode(pixels[c]), refs)
            done = turn_no + 1
            if done % opts.every == 0 or done == opts.turns:
                res.rss.append((done, rss_mib()))
                if log:
                    log(f"turn {done}: RSS {res.rss[-1][1]:.1f} MiB, {res.encoded} encoded, "
                        f"{res.reused} reused, {res.dropped} dropped, {len(res.wrong)} wrong")
    finally:
        session.close()
    res.turns = opts.turns
    res.seconds = time.perf_counter() - start
    return res


def _check_turn(res: SoakResult, turn_no: int, colour: int, turn, fresh: np.ndarray, refs) -> None:
    if len(turn.images) != 1:
        res.wrong.append(f"turn {turn_no}: {len(turn.images)} images in the turn, expected 1")
        return
    used = turn.images[0].embedding
    if used.shape != fresh.shape or not np.array_equal(used, fresh):
        diff = float(np.max(np.abs(used - fresh))) if used.shape == fresh.shape else float("inf")
        res.wrong.append(f"turn {turn_no}: colour {colour} embedding differs from a fresh encode "
                         f"(max abs diff {diff:g})")
    for j, ref in enumerate(refs):
        if j != colour and np.array_equal(used, ref):
            res.wrong.append(f"turn {turn_no}: colour {colour} used colour {j}'s embedding")


def report(res: SoakResult) -> str:
    lines = ["| turns done | VmRSS MiB | vs warm-up MiB |", "|---:|---:|---:|"]
    lines += [f"| {t} | {m:.1f} | {m - res.rss_warm:+.1f} |" for t, m in res.rss]
    lines += [
        "",
        f"turns {res.turns}: images encoded (cache misses) {res.encoded}, reused (hits) {res.reused}; "
        f"resets {res.resets}; turns dropped by drop_oldest {res.dropped}; "
        f"KV positions reused {res.prompt_reused}",
        f"wrong image reuse / embedding mismatches: {len(res.wrong)}",
        f"time per turn: {1000 * res.seconds / res.turns:.1f} ms (loop incl. checks), "
        f"{1000 * res.ask_seconds / res.turns:.1f} ms (ChatSession.ask only)",
        f"RSS after {res.warmup} turns {res.rss_warm:.1f} MiB, at the end {res.rss[-1][1]:.1f} MiB: "
        f"growth {res.growth_mib:+.2f} MiB (KV cache for comparison: {res.kv_mib:.2f} MiB)",
        f"{'PASS' if res.passed else 'FAIL'}: no wrong reuse and growth <= {res.bound_mib:g} MiB "
        f"beyond the warm-up plateau",
    ]
    return "\n".join(lines + res.wrong[:10])


def ensure_bundle(out: Path) -> Path:
    """The tiny llava-hf Q8_0 bundle, converted once in a child process (torch stays out of here)."""
    if (out / "manifest.json").exists() or any(out.glob("*.gguf")):
        return out
    code = ("import sys; from pathlib import Path; "
            "from factedge.convert.bundle import ConvertOptions, convert_checkpoint; "
            "from factedge.train.base.tiny_cache import cached_tiny; "
            "t = cached_tiny('llava-hf', image_size=224); "
            "convert_checkpoint(Path(t.root), Path(sys.argv[1]), ConvertOptions(quants=['Q8_0'], verify=False))")
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code, str(out)], check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = SoakOptions()
    parser.add_argument("--turns", type=int, default=d.turns)
    parser.add_argument("--max-tokens", type=int, default=d.max_tokens)
    parser.add_argument("--n-ctx", type=int, default=d.n_ctx)
    parser.add_argument("--warmup", type=int, default=d.warmup)
    parser.add_argument("--every", type=int, default=d.every)
    parser.add_argument("--bound-mib", type=float, default=d.bound_mib)
    parser.add_argument("--threads", type=int, default=d.threads)
    parser.add_argument("--bundle", type=Path, default=None, help="a converted bundle (default: tiny llava-hf)")
    args = parser.parse_args()
    from factedge.edge.vision_model import ModelOptions, VisionModel

    cache = Path(os.environ.get("FACTEDGE_TEST_CACHE", ROOT / ".cache" / "tests"))
    bundle = args.bundle or ensure_bundle(cache / "soak-bundle")
    opts = SoakOptions(turns=args.turns, max_tokens=args.max_tokens, n_ctx=args.n_ctx, warmup=args.warmup,
                       every=args.every, bound_mib=args.bound_mib, threads=args.threads)
    with VisionModel.open(bundle, options=ModelOptions(n_ctx=opts.n_ctx, threads=opts.threads)) as vision:
        res = run_soak(vision, opts, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(report(res))
    sys.exit(0 if res.passed else 1)


if __name__ == "__main__":
    main()
