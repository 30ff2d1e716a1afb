"""LLaVA as a trainable PyTorch module: CLIP (frozen) + projector + LLaMA, with batched image splicing.

Built by the same `convert.reference.build_loaded` as `convert.reference.TorchLlava` (stock parts,
strict loads over `convert.layouts.load_checkpoint`), so the model that trains is the model that
converts: on one prompt the logits agree with TorchLlava's. What is added
for training:
- batches: `splice` turns token-id lists (IMAGE_TOKEN_INDEX where an image goes, as LLaVA's
  `tokenizer_image_token`) plus per-sample image embeddings into padded `inputs_embeds`, an attention
  mask, position ids derived from the mask (left and right padding give the same numbers) and
  labels with -100 on image, padding and prompt positions;
- logits only where asked: the 32000-wide LM head is most of the cost of a small model, so `forward`
  applies it only at the positions given (`logits_at`), e.g. the positions that predict a label;
- a frozen-vision feature cache: the vision tower never trains, so its features per image are
  computed once (keyed by an image id, a file path, or the pixels' hash); the projector, which may
  train, runs every time.
For LLaVA-RLHF folders the `sft_model/` is the base; its `rlhf_lora_adapter_model/` is NOT applied
(trainers add their own adapters through peft; `.lm` may become a PeftModel).
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel, LlamaForCausalLM

from factedge.convert.chat_template import gguf_chat_template
from factedge.convert.layouts import TOKENIZER_FILES, load_checkpoint, resolve_vision_tower
from factedge.convert.hparams import read_json
from factedge.convert.reference import build_loaded, text_config
from factedge.convert.specs import Checkpoint
from factedge.edge.chat_format import VICUNA_V1, ChatFormat, detect_format
from factedge.edge.errors import ConfigError, InputError
from factedge.edge.image import ImageSource, normalize, prepare_image

if TYPE_CHECKING:
    from factedge.train.config import ModelConfig

IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id in input_ids (never a real vocab row)
IGNORE_INDEX = -100  # label of positions that carry no loss (torch's cross_entropy default)
PaddingSide = Literal["right", "left"]


@dataclass
class Spliced:
    """A padded batch ready for the LM. Shapes: B samples, L positions, T = longest input_ids list."""

    inputs_embeds: torch.Tensor  # [B, L, H]
    attention_mask: torch.Tensor  # [B, L] long, 1 = real position
    position_ids: torch.Tensor  # [B, L] long, from the mask: 0.. over real positions, 0 on padding
    labels: torch.Tensor | None  # [B, L] long, IGNORE_INDEX where no loss
    token_index: torch.Tensor  # [B, T] long: where input_ids[b][t] landed (an image: its first row); -1 = none

    def to(self, device: torch.device | str) -> "Spliced":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Spliced(*(move(getattr(self, f)) for f in ("inputs_embeds", "attention_mask", "position_ids",
                                                           "labels", "token_index")))

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


class FeatureCache:
    """LRU map key -> frozen vision features (CPU), bounded in bytes (ViT-L at 336 px is ~1.2 MB an
    image in bf16, so an unbounded cache over a real dataset would not fit in memory)."""

    def __init__(self, max_mb: float = 4096):
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = 0
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, key: str) -> torch.Tensor:
        self._items.move_to_end(key)
        return self._items[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        if key in self._items:
            self.bytes -= self._items.pop(key).nbytes
        self._items[key] = value
        self.bytes += value.nbytes
        while self.bytes > self.max_bytes and len(self._items) > 1:
            self.bytes -= self._items.popitem(last=False)[1].nbytes


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, L] of positions whose next label counts, targets [K]) for causal-LM loss.

    Position t predicts labels[t + 1]; the last position predicts nothing."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
    return mask, targets


class LlavaForTraining(nn.Module):
    """`.vision` (CLIPVisionModel, frozen), `.projector` (LLaVA indices), `.lm` (LlamaForCausalLM or a
    PeftModel around it), `.ckpt` (the Checkpoint it came from), `.tokenizer` (HF, pad = the config's),
    `.chat_format` (the conversation format every encoder uses for this model)."""

    def __init__(self, ckpt: Checkpoint, vision: CLIPVisionModel, projector: nn.Sequential, lm: nn.Module,
                 tokenizer, chat_format: ChatFormat = VICUNA_V1, *, vision_tower_dir: Path | None = None, feature_cache: bool = True,
                 feature_cache_mb: float = 4096):
        super().__init__()
        self.ckpt, self.tokenizer, self.vision_tower_dir = ckpt, tokenizer, vision_tower_dir
        self.chat_format = chat_format
        self.vision, self.projector, self.lm = vision, projector, lm
        self.vision.requires_grad_(False)
        self.vision.eval()
        self.feature_cache: FeatureCache | None = FeatureCache(feature_cache_mb) if feature_cache else None

    # -- modes and parts -----------------------------------------------------------------------
    def train(self, mode: bool = True) -> "LlavaForTraining":
        super().train(mode)
        self.vision.eval()  # frozen in every stage: no dropout/batch statistics from it
        return self

    def causal_lm(self) -> LlamaForCausalLM:
        """The LlamaForCausalLM under any peft wrapping (its layers carry the LoRA modules)."""
        lm = self.lm
        return lm.get_base_model() if hasattr(lm, "get_base_model") else lm

    @property
    def hidden_size(self) -> int:
        return self.ckpt.text.hidden_size

    @property
    def tokens_per_image(self) -> int:
        return self.ckpt.vision.tokens_per_image

    @property
    def device(self) -> torch.device:
        return self.projector[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.projector[0].weight.dtype

    # -- vision --------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[ImageSource]) -> torch.Tensor:
        """float [B, 3, S, S]: edge.image's pad-to-square + resize, then CLIP normalisation."""
        spec = self.ckpt.vision
        arrays = [normalize(prepare_image(img, spec.image_size, spec.pad_color), spec.image_mean, spec.image_std)
                  for img in images]
        return torch.from_numpy(np.stack(arrays)).to(self.device, self.dtype)

    @torch.no_grad()
    def _vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        spec = self.ckpt.vision
        out = self.vision(pixel_values=pixel_values.to(self.device, self.dtype), output_hidden_states=True)
        features = out.hidden_states[spec.feature_layer]
        return features[:, 1:] if spec.select_feature == "patch" else features

    def vision_features(self, pixel_values: torch.Tensor, keys: Sequence[str] | None = None) -> torch.Tensor:
        """[B, N, Dv] frozen features at the feature layer (CLS dropped for "patch"), cached by key
        (default key: sha1 of the pixel tensor's bytes)."""
        if self.feature_cache is None:
            return self._vision_features(pixel_values)
        if keys is None:
            keys = [hashlib.sha1(p.detach().cpu().float().numpy().tobytes()).hexdigest() for p in pixel_values]
        found = {k: self.feature_cache[k] for k in keys if k in self.feature_cache}
        missing = [i for i, k in enumerate(keys) if k not in found]
        if missing:
            fresh = self._vision_features(pixel_values[missing])
            for i, feats in zip(missing, fresh):
                found[keys[i]] = self.feature_cache[keys[i]] = feats.detach().cpu()
        return torch.stack([found[k] for k in keys]).to(self.device, self.dtype)

    def image_embeds(self, pixel_values: torch.Tensor, keys: Sequence[str] | None = None) -> torch.Tensor:
        """[B, N, H]: what LLaVA splices in for each image (frozen vision, then the projector)."""
        return self.projector(self.vision_features(pixel_values, keys))

    def embed_images(self, images: Sequence[ImageSource], keys: Sequence[str] | None = None) -> torch.Tensor:
        """[B, N, H] from image sources; with the cache, pixels are only decoded for unseen keys
        (default keys: the file path for paths, else the pixels' hash)."""
        if self.feature_cache is None:
            return self.image_embeds(self.pixel_values(images))
        if keys is None:
            keys = [_path_key(img) for img in images]
            if any(k is None for k in keys):
                return self.image_embeds(self.pixel_values(images))
        found = {k: self.feature_cache[k] for k in keys if k in self.feature_cache}
        missing = [i for i, k in enumerate(keys) if k not in found]
        if missing:
            fresh = self.vision_features(self.pixel_values([images[i] for i in missing]), [keys[i] for i in missing])
            found.update({keys[i]: f for i, f in zip(missing, fresh)})
        return self.projector(torch.stack([found[k].to(self.device, self.dtype) for k in keys]))

    # -- splicing ------------------------------------------------------------------------------
    def splice(self, input_ids: Sequence[Sequence[int]],
               image_embeds: torch.Tensor | Sequence[torch.Tensor | None] | None, *,
               padding_side: PaddingSide = "right", labels: Sequence[Sequence[int]] | None = None) -> Spliced:
        """Token ids (IMAGE_TOKEN_INDEX where sample b's image goes) + image_embeds[b] -> a padded batch.

        Each IMAGE_TOKEN_INDEX expands to image_embeds[b]'s N rows (one image per sample; a sample
        without the token is text-only and its entry may be None). `labels[b]` parallels
        `input_ids[b]`; image rows get IGNORE_INDEX."""
        if padding_side not in ("right", "left"):
            raise ConfigError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
        if labels is not None and [len(x) for x in labels] != [len(x) for x in input_ids]:
            raise InputError("labels must have the same lengths as input_ids")
        embed = self.causal_lm().get_input_embeddings()
        device = embed.weight.device
        flat = [t for ids in input_ids for t in ids if t != IMAGE_TOKEN_INDEX]
        vocab = embed.weight.shape[0]
        if flat and (min(flat) < 0 or max(flat) >= vocab):
            raise InputError(f"token id out of range 0..{vocab - 1}")
        text = embed(torch.tensor(flat, dtype=torch.long, device=device)) if flat else None
        rows, lab_rows, index_rows = [], [], []
        cursor = 0
        for b, ids in enumerate(input_ids):
            n_img = sum(1 for t in ids if t == IMAGE_TOKEN_INDEX)
            if n_img > 1:
                raise InputError(f"sample {b} has {n_img} image tokens; one image per sample is supported")
            img = None
            if n_img:
                img = image_embeds[b] if image_embeds is not None else None
                if img is None:
                    raise InputError(f"sample {b} has an image token but no image embeddings")
            parts, lab, where, pos, start = [], [], [], 0, 0
            for t, tok in enumerate(list(ids) + [None]):
                if tok is None or tok == IMAGE_TOKEN_INDEX:
                    n_text = t - start
                    if n_text:
                        parts.append(text[cursor:cursor + n_text])
                        cursor += n_text
                        where.extend(range(pos, pos + n_text))
                        if labels is not None:
                            lab.extend(labels[b][start:t])
                        pos += n_text
                    if tok is not None:
                        parts.append(img.to(text.dtype if text is not None else img.dtype))
                        where.append(pos)
                        lab.extend([IGNORE_INDEX] * img.shape[0])
                        pos += img.shape[0]
                    start = t + 1
            rows.append(torch.cat(parts) if parts else embed.weight.new_zeros(0, embed.weight.shape[1]))
            lab_rows.append(lab)
            index_rows.append(where)
        return _pad(rows, lab_rows if labels is not None else None, index_rows, padding_side)

    # -- the language model --------------------------------------------------------------------
    def hidden_states(self, spliced: Spliced) -> torch.Tensor:
        """[B, L, H]: the last layer after the final norm, before the LM head (for reward/value heads)."""
        out = self.causal_lm().model(inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask,
                                     position_ids=spliced.position_ids, use_cache=False)
        return out.last_hidden_state

    def forward(self, spliced: Spliced, *, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits: [B, L, V] for every position, or [K, V] at the K True positions of `logits_at`."""
        hidden = self.hidden_states(spliced)
        if logits_at is not None:
            hidden = hidden[logits_at]
        return self.causal_lm().lm_head(hidden)

    def lm_loss(self, spliced: Spliced) -> tuple[torch.Tensor, int]:
        """(mean next-token cross-entropy over label positions, their count); head only where needed."""
        if spliced.labels is None:
            raise InputError("lm_loss needs labels")
        mask, targets = next_token_targets(spliced.labels)
        if targets.numel() == 0:
            return spliced.inputs_embeds.sum() * 0.0, 0
        logits = self(spliced, logits_at=mask)
        return F.cross_entropy(logits.float(), targets), int(targets.numel())


def _path_key(img: ImageSource) -> str | None:
    """Cache key of an image file (path + mtime, so an edited file is not served stale), else None."""
    if not isinstance(img, (str, Path)) or (isinstance(img, str) and img.startswith("data:")):
        return None
    path = Path(img)
    try:
        return f"path:{path.resolve()}:{path.stat().st_mtime_ns}"
    except OSError:
        return None  # let the image loader raise its typed error


def _pad(rows: list[torch.Tensor], labels: list[list[int]] | None, index: list[list[int]],
         side: PaddingSide) -> Spliced:
    n, length = len(rows), max((r.shape[0] for r in rows), default=0)
    if length == 0:
        raise InputError("empty batch: no tokens")
    hidden = rows[0].shape[1]
    ref = rows[0]
    embeds = ref.new_zeros(n, length, hidden)
    mask = torch.zeros(n, length, dtype=torch.long, device=ref.device)
    lab = torch.full((n, length), IGNORE_INDEX, dtype=torch.long, device=ref.device) if labels is not None else None
    width = max((len(w) for w in index), default=0)
    token_index = torch.full((n, width), -1, dtype=torch.long, device=ref.device)
    for b, row in enumerate(rows):
        k = row.shape[0]
        off = 0 if side == "right" else length - k
        embeds[b, off:off + k] = row
        mask[b, off:off + k] = 1
        if lab is not None:
            lab[b, off:off + k] = torch.tensor(labels[b], dtype=torch.long, device=ref.device)
        if index[b]:
            token_index[b, :len(index[b])] = torch.tensor(index[b], dtype=torch.long, device=ref.device) + off
    position_ids = (mask.cumsum(1) - 1).clamp(min=0) * mask
    return Spliced(embeds, mask, position_ids, lab, token_index)


@functools.lru_cache(maxsize=8)
def _load_tokenizer(folder: str, stamp: tuple[float, ...]):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, legacy=True)


def _tokenizer(ckpt: Checkpoint):
    """The checkpoint's HF tokenizer, pad = the config's pad id. A SentencePiece one keeps its legacy
    semantics (a dummy prefix after special tokens, as llama.cpp and LLaVA's training tokenizer); a
    tokenizer.json one is read as is. Building one takes seconds, so one per folder (and file
    versions) is kept and shared."""
    folder = Path(ckpt.tokenizer_dir)
    stamp = tuple((folder / n).stat().st_mtime if (folder / n).is_file() else 0.0 for n in TOKENIZER_FILES)
    tok = _load_tokenizer(str(folder.resolve()), stamp)
    tok.pad_token_id = ckpt.text.pad_token_id
    return tok


def training_format(ckpt: Checkpoint, tokenizer) -> ChatFormat:
    """The conversation format the model is trained in: the one its GGUF will carry (Vicuna v1 for
    LLaMA-SentencePiece LLaVAs, the checkpoint's own template otherwise), so the edge talks to the
    trained model exactly as it learnt."""
    fmt = detect_format(gguf_chat_template(Path(ckpt.tokenizer_dir)))
    fmt.check_eos(tokenizer.eos_token)
    return fmt


def _vision_tower_dir(ckpt: Checkpoint, vision_tower: str | Path | None) -> Path | None:
    """The CLIP folder of an original-LLaVA / LLaVA-RLHF checkpoint (full-FT outputs point at it)."""
    if ckpt.layout == "llava-hf":
        return Path(vision_tower) if vision_tower else None
    cfg_path = Path(ckpt.tokenizer_dir) / "config.json"
    return resolve_vision_tower(read_json(cfg_path), cfg_path, vision_tower).resolve()


def load_for_training(path: str | Path, *, vision_tower: str | Path | None = None, dtype: torch.dtype = torch.float32,
                      attn_implementation: str = "sdpa", feature_cache: bool = True,
                      feature_cache_mb: float = 4096) -> LlavaForTraining:
    """A LlavaForTraining from any of the three layouts; every tensor loaded strictly (shapes checked)."""
    if attn_implementation not in ("sdpa", "eager"):
        raise ConfigError(f"attn_implementation must be sdpa or eager, not {attn_implementation!r}")
    ckpt = load_checkpoint(path, vision_tower=vision_tower)
    tcfg = text_config(ckpt.text)
    tcfg._attn_implementation = attn_implementation
    vision, projector, lm = build_loaded(ckpt, dtype, tcfg)
    lm.config.use_cache = False
    tokenizer = _tokenizer(ckpt)
    return LlavaForTraining(ckpt, vision, projector, lm, tokenizer, training_format(ckpt, tokenizer),
                            vision_tower_dir=_vision_tower_dir(ckpt, vision_tower), feature_cache=feature_cache,
                            feature_cache_mb=feature_cache_mb)


def load_from_config(cfg: "ModelConfig") -> LlavaForTraining:
    """`load_for_training` with a config's ModelConfig (what every trainer starts with)."""
    from factedge.train.config import torch_dtype

    if not cfg.base:
        raise ConfigError("model.base (the checkpoint to start from) is required")
    return load_for_training(cfg.base, vision_tower=cfg.vision_tower, dtype=torch_dtype(cfg.dtype),
                             attn_implementation=cfg.attn_implementation, feature_cache=cfg.feature_cache,
                             feature_cache_mb=cfg.feature_cache_mb)
