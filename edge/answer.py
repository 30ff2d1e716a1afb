"""What a turn of chat returns: the answer text and ids, why it stopped, and the timings that
matter on a laptop (load, image encode, prompt and generation speed, KV reuse)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Stats:
    load_s: float = 0.0
    image_encode_s: float = 0.0
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    generated_tokens: int = 0
    generate_s: float = 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0

    @property
    def generate_tps(self) -> float:
        return self.generated_tokens / self.generate_s if self.generate_s else 0.0


@dataclass
class TurnStats(Stats):
    prompt_total: int = 0  # positions of the whole prompt
    prompt_reused: int = 0  # of them, kept from the KV cache (prompt_tokens were evaluated)
    images_encoded: int = 0
    images_reused: int = 0
    dropped_turns: int = 0


@dataclass
class Answer:
    text: str
    tokens: list[int]
    stats: TurnStats
    finish_reason: str  # "stop" (EOS or a stop string) | "length" | "cancelled" (edge/batch.py: the caller gave up)
