"""Fidelity of converted GGUFs against PyTorch, per layout and per file type, in one table.

    python -m bench.probes.fidelity_table [--out DIR]

Builds the tiny checkpoints the tests use (llava-hf, original LLaVA 336 px, LLaVA-RLHF with its LoRA
merged and as a runtime adapter), converts each to f32 + Q8_0 + Q6_K + Q5_K_M + Q4_K_M + Q4_0 with
f32/f16/q8_0 mmproj, and prints what `factedge verify` measures: image-embedding cosine, top-1
agreement and mean KL of next-token distributions after an image prompt, greedy tokens in common.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from factedge.convert.bundle import ConvertOptions, convert_checkpoint
from factedge.convert.layouts import load_checkpoint
from factedge.convert.verify import VerifyOptions, verify_bundle
from factedge.train.base.tiny_cache import cached_tiny

CASES = [
    ("llava-hf (mlp2x_gelu, 224)", dict(layout="llava-hf", image_size=224), "merge"),
    ("LLaVA (mlp2x_gelu, 336)", dict(layout="llava", image_size=336, projector="mlp2x_gelu"), "merge"),
    ("LLaVA-RLHF (linear, LoRA merged)", dict(layout="llava-rlhf", image_size=224), "merge"),
    ("LLaVA-RLHF (linear, LoRA adapter)", dict(layout="llava-rlhf", image_size=224), "adapter"),
]
QUANTS = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where bundles go (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="factedge-fidelity-"))
    print("| model | file | embeddings min cos (3 images) | top-1 | mean KL | greedy equal |")
    print("|---|---|---|---|---|---|")
    for label, params, lora in CASES:
        tiny = cached_tiny(**params)
        ckpt = load_checkpoint(tiny.root)
        bundle = out / f"{params['layout']}-{params['image_size']}-{lora}"
        start = time.perf_counter()
        convert_checkpoint(tiny.root, bundle, ConvertOptions(base_type="f32", quants=QUANTS, lora_mode=lora,
                                                             mmproj_types=["f32", "f16", "q8_0"], verify=False,
                                                             overwrite=True), ckpt=ckpt)
        _, report = verify_bundle(bundle, ckpt, VerifyOptions(n_greedy=32))
        for dtype, figs in report.embeddings.items():
            print(f"| {label} | mmproj {dtype} | {min(f.min_cosine for f in figs):.7f} | | | |")
        for dtype, f in report.logits.items():
            print(f"| {label} | model {dtype} | | {f.top1_agreement * 100:.2f}% | {f.mean_kl:.2e} | "
                  f"{f.greedy_common}/{len(f.greedy_ref)} |")
        print(f"<!-- {label}: converted and verified in {time.perf_counter() - start:.0f} s; "
              f"failures: {report.failures() or 'none'} -->")


if __name__ == "__main__":
    main()
