"""The bundle's model card (`README.md`): what is inside and how faithful each file is."""

from __future__ import annotations

from pathlib import Path

from factedge.convert.fidelity import DECIDED_MARGIN
from factedge.edge.atomic import write_text
from factedge.edge.manifest import Manifest

CARD = "README.md"


def _fidelity_lines(fidelity: dict) -> list[str]:
    if not fidelity:
        return ["Not verified (converted without PyTorch or with --no-verify); run `factedge verify`."]
    lines = ["| file | check | figure |", "|---|---|---|"]
    for dtype, figs in fidelity.get("embeddings", {}).items():
        worst = min(f["min_cosine"] for f in figs)
        lines.append(f"| mmproj {dtype} | image embeddings, min per-token cosine vs PyTorch | {worst:.6f} |")
    for dtype, f in fidelity.get("logits", {}).items():
        lines.append(f"| model {dtype} | top-1 agreement / mean KL after an image prompt | "
                     f"{f['top1_agreement'] * 100:.2f}% / {f['mean_kl']:.2e} |")
        lines.append(f"| model {dtype} | greedy continuation equal to PyTorch | "
                     f"{f['greedy_common']} of {len(f['greedy_ref'])} tokens |")
        if "decided_positions" in f:
            lines.append(f"| model {dtype} | top-1 agreement where PyTorch leads by >= {DECIDED_MARGIN} nats | "
                         f"{f['decided_agreement'] * 100:.2f}% of {f['decided_positions']} positions |")
    tok = fidelity.get("tokenizer")
    if tok:
        lines.append(f"| model | tokenizer vs HF on {tok['texts']} texts | {tok['mismatches']} mismatches |")
    failures = fidelity.get("failures") or []
    lines.append("")
    lines.append("All promised thresholds met." if not failures else "Below threshold: " + "; ".join(failures))
    return lines


def card_text(manifest: Manifest) -> str:
    fp = manifest.fingerprint
    rows = "\n".join(f"| `{f.name}` | {f.role} | {f.dtype} | {f.size / 2**20:.1f} MiB |" for f in manifest.files)
    lora = {None: "none", "merged": "merged into the model files", "adapter": "kept as a runtime adapter"}
    return "\n".join([
        "# factedge bundle",
        "",
        f"Converted from a `{manifest.source.get('layout')}` checkpoint (`{manifest.source.get('path')}`); "
        f"LoRA: {lora.get(manifest.lora, manifest.lora)}.",
        "",
        "| file | role | type | size |",
        "|---|---|---|---|",
        rows,
        "",
        f"Fingerprint `{fp.id}`: n_embd {fp.n_embd}, image {fp.image_size} px, {fp.tokens_per_image} tokens per image.",
        "",
        "## Fidelity against PyTorch",
        "",
        *_fidelity_lines(manifest.fidelity),
        "",
        "Chat with it: `factedge ask --model <this folder> --image photo.jpg \"What is in the image?\"`",
        "",
    ])


def write_card(bundle: Path, manifest: Manifest) -> Path:
    path = bundle / CARD
    write_text(path, card_text(manifest))
    return path
