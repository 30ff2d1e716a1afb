"""The real SmolLM2-135M-Instruct under a LLaVA, through convert, verify and the edge (issue #17).

Builds a llava-hf checkpoint whose LM is the installed SmolLM2 (transformers dequantises the Q4_1
GGUF to float32), with the tiny test CLIP and a fresh projector, written by the installed
transformers' own `save_pretrained`; converts it (f32, Q8_0, Q4_K_M), verifies every file against
PyTorch, and asks the edge a text-only question in the model's own ChatML format. Prints one JSON
object (BENCHMARKS.md, "A real LM under the stack").

    python -m bench.probes.smol_llava --out /tmp/smol-llava [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from factedge.train.base import tiny_weights as tw
from factedge.train.base.smol import smol_gguf, smol_tokenizer
from factedge.train.base.tiny import write_preprocessor

QUESTION = "What is the capital of France? Answer in one sentence."


def build(out: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    gguf = smol_gguf()
    lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = smol_tokenizer(image_token=True)
    lm.resize_token_embeddings(len(tok), pad_to_multiple_of=64)
    vision = tw.tiny_vision(224)
    vcfg = CLIPVisionConfig(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                            num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
                            image_size=vision.image_size, patch_size=vision.patch_size, hidden_act=vision.hidden_act)
    cfg = LlavaConfig(vision_config=vcfg, text_config=lm.config, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    tower, clip = model.model.vision_tower, tw.vision_weights(vision, seed)
    if not any(k.startswith("vision_model.") for k in tower.state_dict()):  # transformers >= 5 drops the level
        clip = {k.removeprefix("vision_model."): v for k, v in clip.items()}
    tower.load_state_dict(clip)
    model.tie_weights()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    write_preprocessor(out, vision)
    return out


def main() -> None:
    from factedge.convert.bundle import ConvertOptions, convert_checkpoint
    from factedge.convert.layouts import load_checkpoint
    from factedge.convert.verify import VerifyOptions, verify_bundle
    from factedge.edge.sampling import SamplingOptions
    from factedge.edge.vision_model import ModelOptions, VisionModel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    t0 = time.perf_counter()
    ckpt_dir = build(args.out / "llava-smollm2-135m-hf")
    t1 = time.perf_counter()
    ckpt = load_checkpoint(ckpt_dir)
    bundle = args.out / "bundle"
    convert_checkpoint(ckpt_dir, bundle, ConvertOptions(base_type="f32", quants=["Q8_0", "Q4_K_M"],
                                                        mmproj_types=["f32"], verify=False, overwrite=True), ckpt=ckpt)
    t2 = time.perf_counter()
    _, report = verify_bundle(bundle, ckpt, VerifyOptions(n_greedy=32, threads=args.threads))
    t3 = time.perf_counter()
    answers = {}
    for quant in ("F32", "Q4_K_M"):
        options = ModelOptions(threads=args.threads, sampling=SamplingOptions(max_tokens=32))
        with VisionModel.open(bundle, quant=quant, options=options) as vision:
            answer = vision.ask(QUESTION)
            answers[quant] = {"text": answer.text, "format": vision.chat_format.name,
                              "tokens_per_s": round(answer.stats.generate_tps, 1)}
    print(json.dumps({
        "seconds": {"build": round(t1 - t0, 1), "convert": round(t2 - t1, 1), "verify": round(t3 - t2, 1)},
        "text": {"layers": ckpt.text.num_layers, "heads": ckpt.text.num_heads, "kv_heads": ckpt.text.num_kv_heads,
                 "vocab_rows": ckpt.text.vocab_size, "tied": ckpt.text.tie_word_embeddings},
        "verify": report.to_dict(), "answers": answers,
    }, indent=1))


if __name__ == "__main__":
    main()
