"""Sampling settings -> a llama.cpp sampler chain (we configure llama.cpp's samplers, not our own)."""

from __future__ import annotations

from dataclasses import dataclass, field

from factedge.edge.errors import ConfigError
from factedge.edge.native import load_llama_cpp

_llama = load_llama_cpp()


@dataclass
class SamplingOptions:
    temperature: float = 0.0  # 0: greedy (the reproducible default)
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int = 0

    def check(self) -> "SamplingOptions":
        """Refuse what llama.cpp's samplers would take silently: NaN and infinities (NaN compares
        false against every bound, so each range is checked as `lo <= x <= hi`), negative counts and
        integers past the C int they are passed as."""
        if not 0 <= self.temperature <= 100:
            raise ConfigError(f"temperature must be in [0, 100], not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], not {self.top_p}")
        if not (0 <= self.top_k < 2**31 and 0 <= self.max_tokens < 2**31 and -1 <= self.repeat_last_n < 2**31):
            raise ConfigError("top_k and max_tokens must be in [0, 2^31), repeat_last_n in [-1, 2^31)")
        if not 0 < self.repeat_penalty <= 100:
            raise ConfigError(f"repeat_penalty must be in (0, 100], not {self.repeat_penalty}")
        return self


class Sampler:
    """Owns a llama.cpp sampler chain built from SamplingOptions."""

    def __init__(self, options: SamplingOptions, n_vocab: int):
        self.options = options.check()
        self._ptr = _llama.llama_sampler_chain_init(_llama.llama_sampler_chain_default_params())
        add = lambda s: _llama.llama_sampler_chain_add(self._ptr, s)  # noqa: E731
        o = self.options
        if o.repeat_penalty != 1.0:
            add(_llama.llama_sampler_init_penalties(n_vocab, o.repeat_last_n, o.repeat_penalty, 0.0, 0.0))
        if o.temperature == 0:
            add(_llama.llama_sampler_init_greedy())
            return
        if o.top_k > 0:
            add(_llama.llama_sampler_init_top_k(o.top_k))
        if o.top_p < 1.0:
            add(_llama.llama_sampler_init_top_p(o.top_p, 1))
        add(_llama.llama_sampler_init_temp(o.temperature))
        add(_llama.llama_sampler_init_dist(o.seed))

    def sample(self, ctx_ptr, row: int = -1) -> int:
        """Pick the next token from the logits of the last decode's `row` (-1: its last row), and
        remember it for penalties."""
        return int(_llama.llama_sampler_sample(self._ptr, ctx_ptr, row))

    def close(self) -> None:
        if self._ptr:
            _llama.llama_sampler_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        try:
            self.close()
        except (AttributeError, TypeError):
            pass
