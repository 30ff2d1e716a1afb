"""Batched sampling from a LlavaForTraining with a KV cache (the rollout's generator).

Our own loop rather than `generate`: the prompt is spliced embeddings (image rows inside the text),
the sampler must draw from one seeded torch.Generator so a CPU run repeats bit for bit, and the
loop stops per sequence at EOS or max_new_tokens. Prompts are left-padded so every sequence's next
token sits in the last column. Defaults are the paper's rollout settings: temperature 1, top-p 1,
top-k 0 (no filtering).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from factedge.edge.errors import ConfigError


def _cache_kw() -> str:
    """The KV-cache argument of LlamaForCausalLM.forward: `cache` (transformers >= 5.2x) or the
    older `past_key_values` (5.17 and before), as convert/reference.py reads it."""
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


@dataclass
class Sampled:
    """Per sequence: the response token ids (EOS included when emitted) and whether EOS came."""

    tokens: list[list[int]]
    has_eos: list[bool]

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def filter_logits(logits: Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Logits after temperature, top-k (0: off) and nucleus top-p (1: off) filtering."""
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0 for sampling, not {temperature}")
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One index per row by inverse CDF: a CPU uniform (so the draw depends only on the CPU RNG
    state, whatever the device) against the row's cumulative sum; 10x cheaper than multinomial
    over a 32000-wide vocabulary. Zero-probability entries can never be drawn (right search)."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64).to(probs.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample(model, prompt_ids: Sequence[Sequence[int]], image_embeds: Tensor | None, *, max_new_tokens: int,
           eos_id: int, pad_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> Sampled:
    """Sample one response per prompt with whatever adapter is active on `model.lm`."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, not {max_new_tokens}")
    spliced = model.splice(prompt_ids, image_embeds, padding_side="left")
    lm = model.causal_lm()
    embed = lm.get_input_embeddings()
    attn, pos = spliced.attention_mask, spliced.position_ids[:, -1:]
    out = lm(inputs_embeds=spliced.inputs_embeds, attention_mask=attn, position_ids=spliced.position_ids,
             use_cache=True, logits_to_keep=1)
    kw = _cache_kw()
    n = len(prompt_ids)
    done = torch.zeros(n, dtype=torch.bool, device=attn.device)
    steps: list[Tensor] = []
    for i in range(max_new_tokens):
        logits = filter_logits(out.logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p)
        tok = draw(logits.softmax(-1), generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        steps.append(tok)
        done = done | (tok == eos_id)
        if bool(done.all()) or i + 1 == max_new_tokens:
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        pos = pos + 1
        out = lm(inputs_embeds=embed(tok[:, None]), attention_mask=attn, position_ids=pos, use_cache=True,
                 logits_to_keep=1, **{kw: getattr(out, kw)})
    table = torch.stack(steps, dim=1).tolist()
    tokens, has_eos = [], []
    for row in table:
        cut = row.index(eos_id) + 1 if eos_id in row else len(row)
        tokens.append(row[:cut])
        has_eos.append(eos_id in row)
    return Sampled(tokens=tokens, has_eos=has_eos)
