"""Conversion time and peak RSS against model size (issue #2): streaming LoRA merge vs loading everything.

LLaVA-RLHF ships its policy as a LoRA over a bf16 SFT model; a converter that `torch.load`s every shard
and merges with PEFT's `merge_and_unload` needs the whole model in RAM. factedge streams: one tensor
is loaded, merged in float32, written and dropped. This script shows the difference side by side on a
locally built LLaVA-RLHF-layout checkpoint (random weights, real shapes, bf16 .bin shards), each
conversion in a fresh child process so its peak RSS is its own (wait4: the child and any
quantizer child it ran; the driver's memory never counts).

    python -m bench.speed.convert_memory --size 1gb          # ~1 GiB of f16 LM weights
    python -m bench.speed.convert_memory --size small        # the shared tiny shapes: a smoke run

Modes: merge (LoRA merged into the f16 LM, streaming), adapter (LoRA kept as a runtime GGUF), naive
(load all shards + PEFT merge_and_unload in memory, then the same GGUF writers). All three write the
f16 LM, a Q4_K_M LM and an f16 mmproj; verification is off (it is timed by its own tests).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from factedge.convert.specs import TextSpec, VisionSpec

MIB = 1024 * 1024
from bench.common import ROOT
MODES = ("merge", "adapter", "naive")

SIZES: dict[str, tuple[TextSpec, VisionSpec]] = {
    # the shared tiny shapes (COMMON.md): seconds, for checking the script itself
    "small": (TextSpec(32000, 256, 512, 2, 4, 4), VisionSpec(224, 14, 64, 128, 3, 4)),
    # TinyLlama-like width, 8 layers: 542M parameters = 1.01 GiB of f16 LM weights; ViT-B/14-like CLIP
    "1gb": (TextSpec(32000, 2048, 5632, 8, 16, 16), VisionSpec(224, 14, 768, 3072, 12, 12)),
    # the same width, 20 layers (2.1 GiB): streaming's peak should not move, the naive one should double
    "2gb": (TextSpec(32000, 2048, 5632, 20, 16, 16), VisionSpec(224, 14, 768, 3072, 12, 12)),
}


def _maxrss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def _files_mib(folder: Path, pattern: str = "*") -> float:
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file()) / MIB


# ---------------------------------------------------------------- child side (runs in a fresh process)
def child_build(args: dict) -> dict:
    """Write the checkpoint with the train builders; the peak RSS shows generation stays near 1.5x."""
    from factedge.train.base.tiny import build_tiny

    text, vision = SIZES[args["size"]]
    root = build_tiny("llava-rlhf", Path(args["dst"]), text=text, vision=vision, seed=0)
    return {"root": str(root)}


def child_floor(args: dict) -> dict:
    """Only the imports each mode pays for: the floor every peak below sits on."""
    import gguf  # noqa: F401
    import torch  # noqa: F401  (factedge imports it lazily, at the first tensor)

    import factedge.convert.bundle  # noqa: F401

    if args["naive"]:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    return {}


class PhaseClock:
    """Phase times and peak-RSS-so-far, fed by the converter's progress callback or explicit marks.

    A phase starts at its mark and ends at the next one (the last: when read). Progress events of a
    step arrive after each tensor (quantize: once, at its start), so a new step name marks the next
    phase; the first phase is named up front and starts at construction."""

    def __init__(self, first: str) -> None:
        self.marks: list[tuple[str, float]] = [(first, time.perf_counter())]
        self.peaks: list[float] = []  # maxrss at the end of each finished phase

    def mark(self, step: str) -> None:
        if self.marks[-1][0] != step:
            self.peaks.append(_maxrss_mib(resource.RUSAGE_SELF))
            self.marks.append((step, time.perf_counter()))

    def __call__(self, step: str, done: int, total: int) -> None:
        self.mark(step)

    def result(self) -> dict:
        """Phases and the conversion's wall time (imports excluded: they are in the floor rows)."""
        phases = self.phases()
        return {"phases": phases, "wall_s": round(sum(p["s"] for p in phases), 2)}

    def phases(self) -> list[dict]:
        ends = [t for _, t in self.marks[1:]] + [time.perf_counter()]
        peaks = self.peaks + [_maxrss_mib(resource.RUSAGE_SELF)]
        return [{"phase": name, "s": round(end - start, 2), "peak_mib": round(peak, 1)}
                for (name, start), end, peak in zip(self.marks, ends, peaks)]


def child_convert(args: dict) -> dict:
    """factedge's own path: convert_checkpoint, LoRA merged (streaming) or kept as an adapter GGUF."""
    from factedge.convert.bundle import ConvertOptions, convert_checkpoint

    clock = PhaseClock("language model f16")  # includes hashing the source files
    opts = ConvertOptions(lora_mode=args["mode"], verify=False, quants=["Q4_K_M"], mmproj_types=["f16"])
    convert_checkpoint(Path(args["src"]), Path(args["dst"]), opts, progress=clock)
    return clock.result()


def child_naive(args: dict) -> dict:
    """What a converter without streaming does: every shard in RAM, PEFT merge_and_unload, then the
    same GGUF writers (so only the load + merge differs from `merge`)."""
    import torch
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from factedge.convert.language_model import write_language_model
    from factedge.convert.layouts import load_checkpoint
    from factedge.convert.mmproj import write_mmproj
    from factedge.convert.quantize import quantize_language_model
    from factedge.convert.weights import find_weight_files

    clock = PhaseClock("torch.load all shards")
    src, dst = Path(args["src"]), Path(args["dst"])
    dst.mkdir(parents=True)
    ckpt = load_checkpoint(src)  # specs, tokenizer and CLIP refs only (headers)
    state: dict[str, torch.Tensor] = {}
    for shard in find_weight_files(src / "sft_model")[0]:
        state.update(torch.load(shard, map_location="cpu", weights_only=True))  # all of it, no mmap
    clock.mark("PEFT load + merge_and_unload")
    t = ckpt.text
    config = LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                         num_key_value_heads=t.num_kv_heads, rms_norm_eps=t.rms_norm_eps,
                         rope_theta=t.rope_theta, max_position_embeddings=t.max_position_embeddings,
                         tie_word_embeddings=False)
    with torch.device("meta"):  # what from_pretrained does: no random init, the loaded tensors are assigned
        model = LlamaForCausalLM(config)
    lm_state = {k: v for k, v in state.items() if ".mm_projector." not in k}
    model.load_state_dict(lm_state, strict=True, assign=True)
    del lm_state, state
    merged = PeftModel.from_pretrained(model, str(ckpt.adapter_dir)).merge_and_unload()
    clock.mark("language model f16")
    tensors = [(name, (lambda w=w: w)) for name, w in merged.state_dict().items()]
    base = write_language_model(ckpt, dst / "model-f16.gguf", tensors=iter(tensors), ftype="f16")
    clock.mark("quantize Q4_K_M")
    quantize_language_model(base, dst / "model-Q4_K_M.gguf", "Q4_K_M")
    clock.mark("mmproj f16")
    write_mmproj(ckpt, dst / "mmproj-f16.gguf", ftype="f16")
    return clock.result()


CHILDREN = {"build": child_build, "floor": child_floor, "convert": child_convert, "naive": child_naive}


def child_main(kind: str, args: dict, result_path: Path) -> None:
    t0 = time.perf_counter()
    result = CHILDREN[kind](args)
    # RUSAGE_CHILDREN would not isolate the quantizer child: Linux counts a forked child's inherited pages
    # (the parent's RSS at exec) in its maxrss, so the driver measures the quantizer on its own
    result.update(work_s=round(time.perf_counter() - t0, 2), self_peak_mib=round(_maxrss_mib(resource.RUSAGE_SELF), 1))
    result_path.write_text(json.dumps(result))


# ---------------------------------------------------------------- driver side
def run_measured(cmd: list[str], quiet: bool = False) -> tuple[float, float]:
    """(wall s, peak RSS MiB) of one command and its children, from wait4. The driver stays small
    (no torch), so the pages a fork inherits from it do not blur the figure."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL if quiet else None,
                            stderr=subprocess.DEVNULL if quiet else None)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} ... failed with exit code {proc.returncode}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024


def run_child(kind: str, args: dict, scratch: Path) -> dict:
    """Run one measurement in a fresh interpreter (peak RSS: it and any quantizer child it ran)."""
    result_path = scratch / f".result-{kind}-{os.getpid()}.json"
    result_path.unlink(missing_ok=True)
    wall, peak = run_measured([sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(args),
                               str(result_path)])
    result = json.loads(result_path.read_text())
    result_path.unlink()
    result.update(process_s=round(wall, 2), peak_mib=round(peak, 1))
    return result


def measure_quantize(f16: Path) -> dict:
    """The quantizer child (libllama's llama_model_quantize) f16 -> Q4_K_M on its own, the native step
    of every mode."""
    from factedge.convert.quantize import quantize_command

    dst = f16.with_name(".bench-Q4_K_M.gguf")
    wall, peak = run_measured(quantize_command(f16, dst, "Q4_K_M"), quiet=True)
    dst.unlink()
    return {"s": round(wall, 2), "peak_mib": round(peak, 1)}


def ensure_checkpoint(size: str, out: Path) -> tuple[Path, dict | None]:
    """The cached checkpoint for `size` (rebuilt when its shapes changed); build stats if built now."""
    text, vision = SIZES[size]
    key = json.dumps({"text": asdict(text), "vision": asdict(vision)}, sort_keys=True)
    folder = out / f"ckpt-{size}"
    marker = folder / ".built.json"
    if marker.is_file():
        record = json.loads(marker.read_text())
        if record["key"] == key and Path(record["root"]).is_dir():
            return Path(record["root"]), None
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    built = run_child("build", {"size": size, "dst": str(folder)}, out)
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps({"key": key, "root": built["root"]}))
    os.replace(tmp, marker)
    return Path(built["root"]), built


def lm_f16_mib(text: TextSpec) -> float:
    from math import prod

    from factedge.convert.shapes import lm_shapes

    return sum(prod(s) for s in lm_shapes(text).values()) * 2 / MIB


def compare_f16(a: Path, b: Path) -> str:
    """How far the naive (PEFT, bf16) merge lands from the streaming (float32) one, tensor by tensor."""
    import numpy as np
    from gguf import GGUFReader

    ta = {t.name: t for t in GGUFReader(a).tensors}
    tb = {t.name: t for t in GGUFReader(b).tensors}
    same, worst, worst_rel = 0, 0.0, 0.0
    for name, t in ta.items():
        x, y = np.asarray(t.data, np.float32), np.asarray(tb[name].data, np.float32)
        diff = float(np.abs(x - y).max())
        same += diff == 0.0
        worst = max(worst, diff)
        worst_rel = max(worst_rel, diff / max(float(np.abs(x).max()), 1e-30))
    return (f"naive vs merge f16 LM: {same}/{len(ta)} tensors bit-identical (the un-adapted ones), "
            f"max |diff| {worst:.3g} ({worst_rel:.2%} of that tensor's max |w|: PEFT adds the delta into the "
            f"bf16 weight, factedge in float32 before the one rounding to f16)")


def _phase_text(phases: list[dict]) -> str:
    return "; ".join(f"{p['phase']} {p['s']:.1f} s ({p['peak_mib']:.0f})" for p in phases)


def report(size: str, root: Path, built: dict | None, floors: dict, runs: dict, quantize: dict | None,
           note: str | None) -> str:
    text, vision = SIZES[size]
    f16 = lm_f16_mib(text)
    src = _files_mib(root / "sft_model", "*.bin")
    lines = [
        f"Checkpoint `{size}`: LLaMA hidden {text.hidden_size}, intermediate {text.intermediate_size}, "
        f"{text.num_layers} layers, vocab {text.vocab_size}; CLIP ViT hidden {vision.hidden_size} x "
        f"{vision.num_layers} layers; LoRA r 64 on q,k,v,o,gate,up,down.",
        f"Sizes on disk: sft_model bf16 .bin shards {src:.0f} MiB, LoRA "
        f"{_files_mib(root / 'rlhf_lora_adapter_model', 'adapter_model.*'):.0f} MiB, CLIP "
        f"{_files_mib(root, 'pytorch_model.bin') - _files_mib(root / 'sft_model', 'pytorch_model.bin'):.0f} MiB; "
        f"LM f16 weights {f16:.0f} MiB.",
    ]
    if built:
        lines.append(f"Building it (train builders, fresh process): {built['process_s']:.0f} s, peak RSS "
                     f"{built['peak_mib']:.0f} MiB ({built['peak_mib'] / f16:.2f}x the LM f16 size).")
    lines.append(f"Import floor (peak RSS of a process that only imports): factedge + torch + gguf "
                 f"{floors['factedge']:.0f} MiB, + transformers + peft {floors['naive']:.0f} MiB.")
    lines += ["", "| mode | wall s (process) | peak RSS MiB | LM f16 MiB | peak RSS / LM f16 | "
                  "(peak - floor) / LM f16 | phases: s (peak RSS MiB of the python process so far) |",
              "|---|---:|---:|---:|---:|---:|---|"]
    labels = {"merge": "merge (streaming LoRA merge)", "adapter": "adapter (LoRA as runtime GGUF)",
              "naive": "naive (torch.load all + PEFT merge_and_unload)"}
    for mode, r in runs.items():
        floor = floors["naive" if mode == "naive" else "factedge"]
        lines.append(f"| {labels[mode]} | {r['wall_s']:.1f} ({r['process_s']:.1f}) | {r['peak_mib']:.0f} | {f16:.0f} | "
                     f"{r['peak_mib'] / f16:.2f} | {(r['peak_mib'] - floor) / f16:.2f} | {_phase_text(r['phases'])} |")
    if quantize:
        lines += ["", f"the quantizer child f16 -> Q4_K_M alone (same f16 file, started from the small driver): "
                      f"{quantize['s']:.1f} s, peak RSS {quantize['peak_mib']:.0f} MiB."]
    if note:
        lines += ["", note]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of merge,adapter,naive")
    parser.add_argument("--keep", action="store_true", help="keep the converted bundles")
    parser.add_argument("--no-quantize-alone", action="store_true", help="skip timing the quantizer child on its own")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= set(MODES):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    root, built = ensure_checkpoint(args.size, out)
    floors = {name: run_child("floor", {"naive": name == "naive"}, out)["peak_mib"] for name in ("factedge", "naive")}
    runs: dict[str, dict] = {}
    dsts = {mode: out / f"bundle-{args.size}-{mode}" for mode in modes}
    for mode in modes:
        shutil.rmtree(dsts[mode], ignore_errors=True)
        kind = "naive" if mode == "naive" else "convert"
        runs[mode] = run_child(kind, {"mode": mode, "src": str(root), "dst": str(dsts[mode])}, out)
        print(f"{mode}: {runs[mode]['wall_s']:.1f} s, peak RSS {runs[mode]['peak_mib']:.0f} MiB", flush=True)
    note, quantize = None, None
    first = next(iter(dsts.values()), None)
    if first is not None and not args.no_quantize_alone:
        quantize = measure_quantize(first / "model-f16.gguf")
    if "merge" in runs and "naive" in runs:
        note = compare_f16(dsts["merge"] / "model-f16.gguf", dsts["naive"] / "model-f16.gguf")
    if not args.keep:
        for dst in dsts.values():
            shutil.rmtree(dst, ignore_errors=True)
    print()
    print(f"command: python -m bench.speed.convert_memory {' '.join(sys.argv[1:])}  (cpus: {os.cpu_count()})")
    print(report(args.size, root, built, floors, runs, quantize, note))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child_main(sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
