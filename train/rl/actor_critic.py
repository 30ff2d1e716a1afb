"""One base LLaVA hosting the RL adapters: policy, reference, value (+ head) and reward (+ head).

As LLaVA-RLHF, a single base model carries every LoRA and the trainer switches between them:
"policy" (trainable; from the RL-init LoRA or fresh), "reference" (frozen copy of the policy's
start), "value" (trainable; from the reward model's LoRA, its Linear head zero-initialised) and
"reward" (the frozen reward model). Switching goes through `lora.use_adapter`, which keeps every
parameter's trainable flag as it is. The base LLaMA, the projector and CLIP stay frozen.

Scoring a batch of (prompt, response) pairs: the sequences are spliced right-padded and the
position that predicts response token j (the one before it) gives its log-probability and the
value of the state before it, as the reference's `logits[:, -response_len - 1:-1]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from factedge.edge.errors import ConfigError
from factedge.train.config import torch_dtype
from factedge.train.lora import add_lora, lora_parameters, use_adapter
from factedge.train.model import LlavaForTraining, Spliced, load_for_training
from factedge.train.rm.model import RewardModel
from factedge.train.rl.config import RLBase

POLICY, REFERENCE, VALUE, REWARD = "policy", "reference", "value", "reward"
VALUE_HEAD = "value_head"


@dataclass
class ResponseBatch:
    """Prompt + response sequences ready to score. B samples, R = longest response."""

    spliced: Spliced
    at: Tensor  # [B, L] bool: positions that predict a response token
    targets: Tensor  # [K] the response tokens, row-major (K = mask.sum())
    mask: Tensor  # [B, R] float, 1 = a real response token


def scatter_rows(flat: Tensor, mask: Tensor) -> Tensor:
    """[K] values in row-major order of mask's True cells -> [B, R] (0 elsewhere)."""
    out = flat.new_zeros(mask.shape)
    out[mask.bool()] = flat
    return out


class ActorCritic:
    """The adapters on one `LlavaForTraining` (`.model`), the value head and the reward model."""

    def __init__(self, model: LlavaForTraining, reward: RewardModel | None, value_head: nn.Linear | None):
        self.model, self.reward, self.value_head = model, reward, value_head
        self._trainable = self._collect_trainables()
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self._trainable.values():
            p.requires_grad_(True)

    @classmethod
    def build(cls, cfg: RLBase, *, value: bool, value_adapter: str | None = None,
              reward: bool = True) -> "ActorCritic":
        """Load the base and attach the adapters `cfg` names (value ones only when `value`; the
        reward model only when `reward`: the oracle and offline DPO need none)."""
        if (reward or value) and not cfg.reward.adapter:
            raise ConfigError("reward.adapter (the reward model folder) is required")
        m = cfg.model
        model = load_for_training(m.base, vision_tower=m.vision_tower, dtype=torch_dtype(m.dtype),
                                  attn_implementation=m.attn_implementation, feature_cache=m.feature_cache)
        if torch.cuda.is_available():
            model.to("cuda")
        add_lora(model, cfg.lora, name=POLICY, init_from=cfg.policy_adapter, trainable=True)
        # a fresh policy LoRA starts with B = 0, so a fresh reference (B = 0 too) is the same function
        add_lora(model, cfg.lora, name=REFERENCE, init_from=cfg.policy_adapter, trainable=False)
        rm = RewardModel.load(model, cfg.reward.adapter, adapter=REWARD, trainable=False) if reward else None
        head = None
        if value:
            add_lora(model, name=VALUE, init_from=value_adapter or cfg.reward.adapter, trainable=True)
            head = nn.Linear(model.hidden_size, 1).to(model.device, model.dtype)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        return cls(model, rm, head)

    # -- parameters ----------------------------------------------------------------------------
    def _collect_trainables(self) -> dict[str, nn.Parameter]:
        params = dict(lora_parameters(self.model, POLICY))
        if self.value_head is not None:
            params.update(lora_parameters(self.model, VALUE))
            params.update({f"{VALUE_HEAD}.{k}": p for k, p in self.value_head.named_parameters()})
        return params

    def trainables(self) -> dict[str, nn.Parameter]:
        """Policy LoRA (+ value LoRA and head): what the optimizer steps and a checkpoint saves."""
        return self._trainable

    def use(self, name: str) -> None:
        use_adapter(self.model, name)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)
        if self.value_head is not None:
            self.value_head.train(mode)

    # -- inputs --------------------------------------------------------------------------------
    @torch.no_grad()
    def image_embeds(self, images: Sequence[Path]) -> Tensor:
        """[B, N, H] projected image features (the projector is frozen in RL: no graph needed)."""
        return self.model.embed_images(list(images))

    def response_batch(self, prompt_ids: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                       embeds: Tensor | None) -> ResponseBatch:
        seqs = [list(p) + list(r) for p, r in zip(prompt_ids, responses)]
        spliced = self.model.splice(seqs, embeds, padding_side="right")
        width = max(len(r) for r in responses)
        device = spliced.attention_mask.device
        mask = torch.zeros(len(seqs), width, device=device)
        at = torch.zeros_like(spliced.attention_mask, dtype=torch.bool)
        for b, (p, r) in enumerate(zip(prompt_ids, responses)):
            mask[b, :len(r)] = 1.0
            landed = spliced.token_index[b, len(p):len(p) + len(r)]
            at[b, landed - 1] = True
        targets = torch.tensor([t for r in responses for t in r], dtype=torch.long, device=device)
        return ResponseBatch(spliced, at, targets, mask)

    # -- scores --------------------------------------------------------------------------------
    def logprobs(self, batch: ResponseBatch, adapter: str, temperature: float = 1.0,
                 with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        """([B, R] log π(response token) under `adapter`, [B, R] entropy or None)."""
        self.use(adapter)
        logits = self.model(batch.spliced, logits_at=batch.at).float() / temperature
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp.gather(1, batch.targets[:, None]).squeeze(1)
        entropy = None
        if with_entropy:
            with torch.no_grad():
                entropy = scatter_rows(-(logp.exp() * logp).sum(-1), batch.mask)
        return scatter_rows(picked, batch.mask), entropy

    def values(self, batch: ResponseBatch) -> Tensor:
        """[B, R] V(state before each response token) from the value adapter and head."""
        if self.value_head is None:
            raise ConfigError("this actor-critic was built without a value model")
        self.use(VALUE)
        hidden = self.model.hidden_states(batch.spliced)[batch.at]
        v = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return scatter_rows(v, batch.mask)

    @torch.no_grad()
    def rewards(self, input_ids: Sequence[Sequence[int]], images: Sequence[Path]) -> Tensor:
        """[B] reward-model scores of reward inputs (reward_prompt.encode_reward_input)."""
        if self.reward is None:
            raise ConfigError("this actor-critic was built without a reward model")
        return self.reward.score(input_ids, list(images))
