"""Switch a loaded chat between the base (SFT) model and its LoRA (RLHF) adapter at runtime.

LLaVA-RLHF's LoRA touches only the language model, so the CLIP encoder and projector, and with them
every cached image embedding, are the same for any adapter scale: switching keeps the image cache and
the history, and only forgets the KV cache (computed with the old weights), from position 0. Nothing
is reloaded; the next turn re-evaluates the prompt with the new weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from factedge.edge.chat import ChatSession
from factedge.edge.errors import ConfigError
from factedge.edge.image import ImageSource
from factedge.edge.runtime import LoraAdapter
from factedge.edge.sampling import SamplingOptions
from factedge.edge.answer import Answer

BASE, ADAPTER = "base", "adapter"


def set_adapter(session: ChatSession, scale: float, adapter: LoraAdapter | None = None) -> None:
    """Apply `adapter` (default: the one the session's VisionModel loaded) at `scale` in [0, 1].

    Scale 0 removes the adapter from the context altogether, so the answers are exactly the base
    model's (no zero-scaled LoRA matmuls left in the graph)."""
    if not 0.0 <= scale <= 1.0:
        raise ConfigError(f"adapter scale must be in [0, 1], not {scale}")
    adapter = adapter if adapter is not None else session.vision.adapter
    if adapter is None and scale > 0:
        raise ConfigError("this model was opened without a LoRA adapter; only scale 0 (the base model) applies")
    if adapter is not None and adapter.model is not session.model:
        raise ConfigError("this adapter was loaded for another model", adapter.path)
    session.set_adapter(adapter, scale)  # the next turn re-evaluates from position 0 with the new weights


def adapter_scale(session: ChatSession) -> float:
    """The scale the session's context applies now (0: the base model)."""
    return session.adapter_scale


@dataclass
class Comparison:
    question: str
    base: Answer  # adapter scale 0 (LLaVA-RLHF: the SFT model)
    adapter: Answer  # adapter scale `scale` (the RLHF model)
    scale: float

    def as_dict(self) -> dict:
        return {"question": self.question, "scale": self.scale,
                BASE: _answer_dict(self.base), ADAPTER: _answer_dict(self.adapter)}


def compare_adapters(session: ChatSession, question: str, image: ImageSource | None = None, *,
                     scale: float = 1.0, sampling: SamplingOptions | None = None) -> Comparison:
    """Answer one question about one image with the base model and with the adapter, encoding the
    image once (the second answer reuses the session's image cache). The session ends empty, with
    the adapter scale it had before."""
    if session.vision.adapter is None:
        raise ConfigError("comparing needs a model opened with a LoRA adapter")
    before = adapter_scale(session)
    answers = []
    try:
        for s in (0.0, scale):
            session.reset()
            set_adapter(session, s)
            answers.append(session.ask(question, image, sampling))
    finally:
        session.reset()
        set_adapter(session, before)
    return Comparison(question, answers[0], answers[1], scale)


def _answer_dict(answer: Answer) -> dict:
    s = answer.stats
    figures = {**vars(s), "prompt_tps": s.prompt_tps, "generate_tps": s.generate_tps}
    return {"answer": answer.text, "tokens": answer.tokens, "finish_reason": answer.finish_reason, "stats": figures}
