"""The reward model: the training LLaVA + a LoRA adapter + `Linear(hidden, 1)` read at the last token.

As LLaVA-RLHF's `RewardModel`: the head's bias starts at 0, the score is the head applied to the
last layer's hidden state (after the final norm) at the last token of the reward input (the "is" of
"... the quality score of my last response is"). Saved as LLaVA-RLHF's `rm_lora_adapter_model/`:
a PEFT folder plus `reward_head.safetensors` (`weight` [1, hidden], `bias` [1]). The adapter lives
on the shared base under its own name (default "reward"), so PPO can host it beside the policy,
reference and value adapters on one model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from factedge.edge.chat_format import VICUNA_V1, ChatFormat
from factedge.edge.errors import ConfigError, InputError, MismatchError
from factedge.edge.image import ImageSource
from factedge.train.config import LoraSettings
from factedge.train.lora import add_lora, save_lora, use_adapter
from factedge.train.model import LlavaForTraining, Spliced
from factedge.train.rm.prompt import rating_request, reward_form, verdict_text

HEAD_FILE = "reward_head.safetensors"
RM_DIR = "rm_lora_adapter_model"
FORM_KEY = "reward_prompt"  # the head file's metadata: which reward prompt form (rm.prompt) it reads


def last_positions(spliced: Spliced, lengths: Sequence[int]) -> torch.Tensor:
    """[B] index in the spliced batch of each sample's last token (any padding side)."""
    idx = torch.tensor([n - 1 for n in lengths], dtype=torch.long, device=spliced.token_index.device)
    return spliced.token_index.gather(1, idx[:, None])[:, 0]


def score_token(tokenizer, word: str, fmt: ChatFormat = VICUNA_V1, form: str = "paper") -> int:
    """The one token id `word` is right after the score position of reward prompt `form`."""
    lead_text = rating_request(None, None, fmt, form)
    lead = tokenizer.encode(lead_text, add_special_tokens=False)
    ids = tokenizer.encode(lead_text + verdict_text(word, fmt, form), add_special_tokens=False)
    if ids[:len(lead)] != lead or len(ids) != len(lead) + 1:
        raise ConfigError(f"reward head word {word!r} is not one token after the {form} reward prompt")
    return ids[-1]


def reading_head(model: LlavaForTraining, form: str = "paper") -> nn.Linear:
    """Linear(hidden, 1) whose score is the LM's logit(good) - logit(bad) at the score position, for
    the verdict words of reward prompt `form` ("high"/"low" after the paper's prefix, "Yes"/"No").

    Why: the head reads the final-norm hidden state, which the LM head turns into next-token logits,
    so the difference of two output rows is exactly the LM's zero-shot verdict. A pretrained LM that
    reads the captions starts as a fact-checking judge, and the Bradley-Terry training refines it
    instead of finding a reader from a few hundred pairs."""
    good, bad = (score_token(model.tokenizer, w, model.chat_format, form) for w in reward_form(form).words)
    rows = model.causal_lm().lm_head.weight.detach()
    head = nn.Linear(model.hidden_size, 1).to(rows.device, model.dtype)
    with torch.no_grad():
        head.weight.copy_((rows[good] - rows[bad]).to(model.dtype)[None])
        head.bias.zero_()
    return head


class RewardModel(nn.Module):
    """`model` with adapter `adapter` active + `head`; `forward(spliced, lengths) -> rewards [B]`."""

    def __init__(self, model: LlavaForTraining, adapter: str = "reward", head: nn.Linear | None = None,
                 form: str = "paper"):
        super().__init__()
        self.model, self.adapter, self.form = model, adapter, reward_form(form).name
        if head is None:
            head = nn.Linear(model.hidden_size, 1).to(model.device, model.dtype)
            nn.init.zeros_(head.bias)
        self.head = head

    @classmethod
    def create(cls, model: LlavaForTraining, lora: LoraSettings | None = None, *, adapter: str = "reward",
               init_from: str | Path | None = None, form: str = "paper", reading: bool = False) -> "RewardModel":
        """A fresh trainable LoRA (or one loaded from `init_from`) and a fresh head (bias 0) for reward
        prompt `form`; `reading`: the head starts as the LM's own verdict (`reading_head`)."""
        head = reading_head(model, form) if reading else None
        add_lora(model, lora, name=adapter, init_from=init_from, trainable=True)
        return cls(model, adapter, head, form)

    @classmethod
    def load(cls, model: LlavaForTraining, folder: str | Path, *, adapter: str = "reward",
             trainable: bool = False) -> "RewardModel":
        """A saved reward model (PEFT folder + reward_head.safetensors) on `model`'s base; its prompt
        form is the head file's `reward_prompt` metadata (absent: "paper", as LLaVA-RLHF's)."""
        from safetensors import safe_open

        folder = Path(folder)
        head_file = folder / HEAD_FILE
        if not head_file.is_file():
            raise InputError(f"reward model folder has no {HEAD_FILE}", folder)
        add_lora(model, name=adapter, init_from=folder, trainable=trainable)
        with safe_open(str(head_file), "pt") as f:  # the tensors and the form, one read
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            form = (f.metadata() or {}).get(FORM_KEY, "paper")
        head = nn.Linear(model.hidden_size, 1)
        if set(tensors) != {"weight", "bias"} or tuple(tensors["weight"].shape) != (1, model.hidden_size):
            raise MismatchError(f"reward head must be weight [1, {model.hidden_size}] + bias [1]", head_file)
        head.load_state_dict(tensors)
        head.to(model.device, model.dtype).requires_grad_(trainable)
        return cls(model, adapter, head, form)

    def forward(self, spliced: Spliced, lengths: Sequence[int]) -> torch.Tensor:
        """Rewards [B] (float32) at each sample's last token; `lengths` = len(input_ids[b])."""
        use_adapter(self.model, self.adapter)
        hidden = self.model.hidden_states(spliced)
        rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_positions(spliced, lengths)]
        return self.head(rows.to(self.head.weight.dtype)).squeeze(-1).float()

    def score(self, input_ids: Sequence[Sequence[int]], images: Sequence[ImageSource | None]) -> torch.Tensor:
        """Rewards [B] for reward inputs (see reward_prompt.encode_reward_input) and their images."""
        shown = [img for img in images if img is not None]
        embeds = iter(self.model.embed_images(shown)) if shown else iter(())
        per_sample = [next(embeds) if img is not None else None for img in images]
        spliced = self.model.splice(input_ids, per_sample, padding_side="left")
        return self(spliced, [len(ids) for ids in input_ids])

    def save(self, out: str | Path, base: str | Path | None = None) -> Path:
        """PEFT folder + reward_head.safetensors at `out`, written as one (a temp folder renamed)."""
        head = {k: v.float() for k, v in self.head.state_dict().items()}
        return save_lora(self.model, out, name=self.adapter, base=base, extra={HEAD_FILE: head},
                         metadata={HEAD_FILE: {FORM_KEY: self.form}})
