"""The demo behind `factedge demo`: Fact-RLHF on the shapes world -> a bundle -> SFT vs RLHF answers.

Three cached steps, each keyed by content so a second run only answers:
1. `run_recipe` trains a small LLaVA on the synthetic world (SFT -> Fact-RM -> PPO) and returns the
   LLaVA-RLHF layout (`sft_model/` + `rlhf_lora_adapter_model/`);
2. `convert_checkpoint` makes a bundle with the RLHF LoRA kept as a *runtime adapter* (f16 + quants,
   mmproj f16), so one loaded base answers as SFT (adapter scale 0) and as RLHF (scale 1);
3. fresh images (demo_items) are asked a describe and a short question with both scales, and the
   world's judge rates every answer (MMHal's 0-6, hallucinated or not);
4. both scales answer the recipe's held-out split (train/demo/heldout.py), for one line of figures.
The library never prints: it reports through `log` and `progress` and returns a DemoResult.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from factedge.convert.bundle import ConvertOptions, Progress, convert_checkpoint
from factedge.edge.errors import ConfigError
from factedge.edge.manifest import MANIFEST
from factedge.train.demo.items import DemoItem, demo_items
from factedge.train.world.judge import Verdict, judge

ENV_CACHE = "FACTEDGE_CACHE"
LM_QUANTS = ("Q8_0", "Q4_K_M")
DEMO_SEED = 777  # the demo's image stream ("demo" split; the recipe uses "train"/"heldout")

Log = Callable[[str], None]
# (cache_dir, progress, log) -> an object with root, world, metrics, cached (train.recipe.RecipeResult)
Recipe = Callable[[Path, "Progress | None", Log], object]


def cache_root() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "factedge")


@dataclass
class DemoOptions:
    scale: str | None = None  # recipe preset "micro" | "cpu" | "gpu"; None: "gpu" when CUDA is available
    base: str = "tiny"  # tiny: a LLaMA trained from scratch (15 minutes); smol: SmolLM2-135M (recipe_smol.py)
    n_images: int = 3
    seed: int = DEMO_SEED
    quant: str = "Q4_K_M"  # the quant that answers
    quants: tuple[str, ...] = LM_QUANTS  # written into the bundle (plus the f16 base)
    max_tokens: int = 64
    threads: int = 0  # 0: os.cpu_count() (llama.cpp's own default oversubscribes a busy small box)
    n_gpu_layers: int | None = None  # None: all layers when the native build has a GPU backend
    verify: bool = False  # check the bundle against PyTorch while converting (~1.5 min even on the micro model)
    heldout: int = 200  # held-out questions both models answer for the summary line (0: skip)
    cache_dir: Path | None = None  # default: $FACTEDGE_CACHE or ~/.cache/factedge, then demo/


@dataclass
class DemoRow:
    image: Path
    question: str
    qtype: str  # describe | yes_no | multiple_choice | open
    truth: str  # the reference answer in the world's language
    sft: str
    rlhf: str
    sft_verdict: Verdict
    rlhf_verdict: Verdict


@dataclass
class DemoResult:
    checkpoint: Path
    bundle: Path
    quant: str
    rows: list[DemoRow]
    metrics: dict
    trained: bool  # False: the recipe's cached model was reused
    converted: bool  # False: the cached bundle was reused
    timings: dict[str, float] = field(default_factory=dict)  # recipe_s, convert_s, answer_s, heldout_s, total_s
    runtime: dict = field(default_factory=dict)  # threads, n_gpu_layers, backend
    heldout: dict = field(default_factory=dict)  # train/demo/heldout.py: {"n", "sft": figures, "rlhf": figures}
    base: str = "tiny"  # DemoOptions.base: which LM the model was trained on

    @property
    def images(self) -> list[Path]:
        return list(dict.fromkeys(r.image for r in self.rows))

    def hallucination_rate(self, which: str) -> float:
        """Share of answers (SFT or RLHF) the judge found a hallucination in."""
        flags = [getattr(r, f"{which}_verdict").hallucinated for r in self.rows]
        return sum(flags) / len(flags) if flags else 0.0

    def mean_score(self, which: str) -> float:
        scores = [getattr(r, f"{which}_verdict").score for r in self.rows]
        return sum(scores) / len(scores) if scores else 0.0


BASES = {"tiny": "llama", "smol": "smollm2"}  # --base -> the recipe's LM (recipe_preset's lm)


def default_recipe(scale: str | None, base: str = "tiny") -> Recipe:
    """train.recipe.run_recipe with its preset for this machine ("gpu" when CUDA is available); the smol
    base at micro scale is SmolLM2's structure at test size (a smoke test, like micro itself)."""
    if base not in BASES:
        raise ConfigError(f"base must be one of {', '.join(BASES)}, not {base!r}")

    def run(cache_dir: Path, progress: Progress | None, log: Log):
        import torch

        from factedge.train.recipe import recipe_preset, run_recipe

        chosen = scale or ("gpu" if torch.cuda.is_available() else "cpu")
        lm = "smollm2-init" if base == "smol" and chosen == "micro" else BASES[base]
        cfg = recipe_preset(chosen, lm=lm)
        # the recipe reports (stage, done, total, metrics); the bars take (step, done, total)
        stage_progress = None if progress is None else (lambda stage, done, total, _m: progress(stage, done, total))
        return run_recipe(cfg, cache_dir, stage_progress, log)
    return run


def runtime_settings(threads: int, n_gpu_layers: int | None) -> dict:
    """Explicit threads, and GPU offload when the native build has a GPU backend."""
    from factedge.edge.native import build_info

    backend = build_info().get("backend", "cpu")
    if n_gpu_layers is None:
        n_gpu_layers = 0 if backend == "cpu" else -1
    return {"threads": threads or os.cpu_count() or 1, "n_gpu_layers": n_gpu_layers, "backend": backend}


def convert_options(options: DemoOptions, threads: int) -> ConvertOptions:
    return ConvertOptions(lora_mode="adapter", base_type="f16", quants=list(options.quants),
                          mmproj_types=["f16"], verify=options.verify, overwrite=True, threads=threads)


def bundle_key(checkpoint: Path, convert: ConvertOptions) -> str:
    """The checkpoint (path + every file's size and mtime: a retrain changes it) + what is produced."""
    h = hashlib.sha256(str(Path(checkpoint).resolve()).encode())
    for p in sorted(Path(checkpoint).rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(checkpoint)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(convert.key(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def ensure_bundle(checkpoint: Path, out_root: Path, convert: ConvertOptions, progress: Progress | None,
                  log: Log) -> tuple[Path, bool]:
    """The checkpoint's bundle, converted now (True) or reused (False); convert writes atomically."""
    bundle = out_root / bundle_key(checkpoint, convert)
    if (bundle / MANIFEST).is_file():
        return bundle, False
    log(f"converting {checkpoint} -> {bundle} (RLHF LoRA as a runtime adapter; f16 + "
        f"{', '.join(convert.quants)}; mmproj f16{'; verified against PyTorch' if convert.verify else ''})")
    convert_checkpoint(checkpoint, bundle, convert, progress)
    return bundle, True


def answer_items(bundle: Path, items: list[DemoItem], *, quant: str, max_tokens: int, runtime: dict,
                 log: Log) -> list[DemoRow]:
    """Both answers per item from one loaded model (adapter scale 0 = SFT, 1 = RLHF), judged."""
    from factedge.edge.adapters import compare_adapters
    from factedge.edge.chat import ChatSession, SessionOptions
    from factedge.edge.sampling import SamplingOptions
    from factedge.edge.vision_model import ModelOptions, VisionModel

    greedy = SamplingOptions(temperature=0.0, max_tokens=max_tokens)
    options = ModelOptions(n_ctx=1024, threads=runtime["threads"], n_gpu_layers=runtime["n_gpu_layers"],
                           mmproj_on_gpu=runtime["n_gpu_layers"] != 0)
    rows = []
    with VisionModel.open(bundle, quant=quant, options=options) as vision, \
            ChatSession(vision, SessionOptions(n_ctx=1024, image_cache=len(items))) as session:
        for k, item in enumerate(items, 1):
            log(f"[{k}/{len(items)}] {item.image.name}: {item.qa.question.splitlines()[0]}")
            c = compare_adapters(session, item.qa.question, item.image, scale=1.0, sampling=greedy)
            rows.append(DemoRow(item.image, item.qa.question, item.qa.type, item.qa.answer, c.base.text,
                                c.adapter.text, judge(item.scene, c.base.text, item.qa.question),
                                judge(item.scene, c.adapter.text, item.qa.question)))
    return rows


def run_demo(options: DemoOptions | None = None, *, recipe: Recipe | None = None, progress: Progress | None = None,
             log: Log = lambda _m: None) -> DemoResult:
    """Train (or reuse), convert (or reuse), then answer and judge; see the module doc."""
    o = options or DemoOptions()
    start = time.perf_counter()
    cache = Path(o.cache_dir) if o.cache_dir else cache_root() / "demo"
    runtime = runtime_settings(o.threads, o.n_gpu_layers)
    timings = {}

    t = time.perf_counter()
    stages = "projector -> SFT -> Fact-RM -> PPO on SmolLM2-135M" if o.base == "smol" else "SFT -> Fact-RM -> PPO"
    log(f"training (or reusing) the demo model: shapes world -> {stages}")
    result = (recipe or default_recipe(o.scale, o.base))(cache / "recipe", progress, log)
    timings["recipe_s"] = time.perf_counter() - t

    t = time.perf_counter()
    bundle, converted = ensure_bundle(Path(result.root), cache / "bundles", convert_options(o, runtime["threads"]),
                                      progress, log)
    timings["convert_s"] = time.perf_counter() - t

    t = time.perf_counter()
    items = demo_items(bundle / "demo-images", o.n_images, o.seed, getattr(result, "world", None))
    rows = answer_items(bundle, items, quant=o.quant, max_tokens=o.max_tokens, runtime=runtime, log=log)
    timings["answer_s"] = time.perf_counter() - t

    t = time.perf_counter()
    split = getattr(getattr(result, "world", None), "heldout", None)
    heldout = {}
    if o.heldout > 0 and split is not None:
        from factedge.train.demo.heldout import heldout_figures

        log(f"answering {o.heldout} held-out questions with both models (judged, for the summary line)")
        heldout = heldout_figures(bundle, Path(split.root), quant=o.quant, limit=o.heldout, max_tokens=o.max_tokens,
                                  runtime=runtime)
    timings["heldout_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    return DemoResult(Path(result.root), bundle, o.quant, rows, dict(getattr(result, "metrics", {}) or {}),
                      not getattr(result, "cached", False), converted, timings, runtime, heldout, o.base)


def should_chat(no_chat: bool, stdin, stdout) -> bool:
    """Chat only when asked not to skip it and both ends are a terminal (never in CI or a pipe)."""
    return not no_chat and _isatty(stdin) and _isatty(stdout)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
