"""The numbers that say a GGUF computes what PyTorch computes.

Pure functions over numpy arrays: per-token cosine of image embeddings, top-1 agreement and mean KL
of next-token distributions, length of the common greedy prefix. `verify.py` gathers them into a
report; tests assert them; the CLI prints them. One implementation, so a user sees the figure a test
asserts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


def token_cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of `got` against the same row of `ref` (shapes must match)."""
    if ref.shape != got.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs gguf {got.shape}")
    a, b = ref.astype(np.float64), got.astype(np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, 1e-30)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_per_position(ref_logits: np.ndarray, got_logits: np.ndarray) -> np.ndarray:
    """KL(p_ref || p_gguf) at each position, in nats."""
    lp, lq = _log_softmax(ref_logits), _log_softmax(got_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class EmbeddingFigures:
    image: str
    tokens: int
    min_cosine: float
    mean_cosine: float
    max_abs_diff: float

    @classmethod
    def compare(cls, image: str, ref: np.ndarray, got: np.ndarray) -> "EmbeddingFigures":
        cos = token_cosines(ref, got)
        return cls(image, int(ref.shape[0]), float(cos.min()), float(cos.mean()),
                   float(np.abs(ref.astype(np.float64) - got).max()))


# A position is "decided" when PyTorch's top-1 logit leads its top-2 by at least this much (nats of
# log-probability ratio). On a random-weight model about half the positions are near-ties, and a
# quantized file flips those with a probability that depends on the machine's kernels (summation
# order); Q8_0's top-1/top-2 noise is ~0.25 nats (measured: no flip above a 0.5 gap in ~1,000
# positions of three layouts), so at 1.5 a flip means a conversion fault, not a near-tie.
DECIDED_MARGIN = 1.5


@dataclass
class LogitFigures:
    positions: int
    top1_agreement: float
    mean_kl: float
    max_kl: float
    greedy_ref: list[int]
    greedy_gguf: list[int]
    decided_positions: int = 0  # positions where the reference's top-1 leads by >= DECIDED_MARGIN
    decided_agreement: float = 1.0  # top-1 agreement on those

    @property
    def greedy_common(self) -> int:
        return common_prefix(self.greedy_ref, self.greedy_gguf)

    @property
    def greedy_identical(self) -> bool:
        return self.greedy_ref == self.greedy_gguf

    @classmethod
    def compare(cls, ref_logits: np.ndarray, got_logits: np.ndarray, greedy_ref: list[int],
                greedy_gguf: list[int]) -> "LogitFigures":
        if ref_logits.shape[0] != got_logits.shape[0]:
            raise ValueError(f"positions differ: {ref_logits.shape[0]} vs {got_logits.shape[0]}")
        # llava-hf pads the vocab: compare over the rows both sides really have
        n_vocab = min(ref_logits.shape[1], got_logits.shape[1])
        ref, got = ref_logits[:, :n_vocab], got_logits[:, :n_vocab]
        kl = kl_per_position(ref, got)
        agree = ref.argmax(-1) == got.argmax(-1)
        top2 = np.sort(ref, axis=-1)[:, -2:]
        decided = (top2[:, 1] - top2[:, 0]) >= DECIDED_MARGIN
        return cls(int(ref.shape[0]), float(agree.mean()), float(kl.mean()), float(kl.max()), list(greedy_ref),
                   list(greedy_gguf), int(decided.sum()), float(agree[decided].mean()) if decided.any() else 1.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["greedy_common"] = self.greedy_common
        d["greedy_identical"] = self.greedy_identical
        return d
