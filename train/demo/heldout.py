"""The demo's held-out line: SFT and RLHF answer the recipe's held-out split through the bundle.

Three fresh images show what the answers look like; they cannot say whether alignment helped. So
both models (adapter scale 0 and 1 of the quantized bundle the user chats with) answer the held-out
split greedily through the batch engine (exact mode: the one-at-a-time answers), and the world's judge
scores them as the benchmarks do (train/heldout_eval.score_answers): hallucination rate beside
coverage, so a model that says less is not mistaken for one that hallucinates less.
"""

from __future__ import annotations

from pathlib import Path

from factedge.train.heldout_eval import heldout_items, question_of, score_answers

SCALES = {"sft": 0.0, "rlhf": 1.0}


def heldout_figures(bundle: Path, split_root: Path, *, quant: str, limit: int, max_tokens: int,
                    runtime: dict) -> dict:
    """{"n": items, "sft": figures, "rlhf": figures} (figures as score_answers returns them)."""
    from factedge.edge.batch import BatchOptions, BatchSession, Request
    from factedge.edge.sampling import SamplingOptions
    from factedge.edge.vision_model import ModelOptions, VisionModel

    root = Path(split_root)
    items = heldout_items(root, limit)
    greedy = SamplingOptions(temperature=0.0, max_tokens=max_tokens)
    out: dict = {"n": len(items)}
    for name, scale in SCALES.items():
        options = ModelOptions(n_ctx=1024, threads=runtime["threads"], n_gpu_layers=runtime["n_gpu_layers"],
                               mmproj_on_gpu=runtime["n_gpu_layers"] != 0, adapter_scale=scale)
        with VisionModel.open(bundle, quant=quant, options=options) as vision, \
                BatchSession(vision, BatchOptions(parallel=4, seq_ctx=512, image_cache=8)) as batch:
            outcomes = batch.answer_all(Request(question_of(it), root / "images" / it["image"], greedy)
                                        for it in items)
        answers = []
        for o in outcomes:
            if o.error is not None:
                raise o.error
            answers.append((o.answer.text, len(o.answer.tokens), o.answer.finish_reason == "stop"))
        out[name] = score_answers(root, items, answers)
    return out
