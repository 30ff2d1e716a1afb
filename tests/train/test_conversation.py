"""LLaVA JSON -> ids/labels: the same ids as tokenising the whole Vicuna text at once (LLaVA's way),
labels exactly on the replies and their </s>."""

from __future__ import annotations

import pytest

from factedge.edge.errors import InputError
from factedge.edge.prompt import Conversation, single_turn, split_at_images
from factedge.train.conversation import conversation_turns, encode_conversation, encode_prompt, pieces_text
from factedge.train.conversation import truncate, turn_pieces
from factedge.train.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX

ITEM = {"id": "1", "image": "a.png", "conversations": [
    {"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "Two."}]}


@pytest.fixture(scope="module")
def tok(small_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(small_base), legacy=True)


def _joint(text, tok):
    ids = []
    for seg in split_at_images(text, lambda piece, first: tok(piece, add_special_tokens=first).input_ids):
        ids.extend([IMAGE_TOKEN_INDEX] if seg is None else seg)
    return ids


def test_hand_checked_example(tok):
    ids, labels = encode_conversation(ITEM, tok)
    text = Conversation(turns=conversation_turns(ITEM)).text()
    assert pieces_text(turn_pieces(conversation_turns(ITEM))) == text
    assert text.endswith(" USER: <image>\nWhat is this? ASSISTANT: A red circle.</s>USER: How many? ASSISTANT: Two.</s>")
    assert ids == _joint(text, tok)  # piecewise == whole-text tokenisation (with </s> read as EOS)
    assert ids[0] == 1 and ids.count(IMAGE_TOKEN_INDEX) == 1
    # "... USER: " (ER : ▁) then the image, then "\nWhat" (▁ <0x0A> What), as LLaVA and llama.cpp
    i = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[i - 3:i] == [1001, 29901, 29871] and ids[i + 1:i + 4] == [29871, 13, 5618]
    targets = [t for t in labels if t != IGNORE_INDEX]
    assert tok.convert_ids_to_tokens(targets) == ["▁A", "▁red", "▁circle", ".", "</s>", "▁Two", ".", "</s>"]
    # the labelled positions are exactly the two replies, each right after "ASSISTANT:" (…ANT :)
    spans = [k for k, t in enumerate(labels) if t != IGNORE_INDEX]
    first, second = spans[:5], spans[5:]
    assert first == list(range(first[0], first[0] + 5)) and second == list(range(second[0], second[0] + 3))
    for start in (first[0], second[0]):
        assert ids[start - 2:start] == [13566, 29901]
    assert all(labels[k] == ids[k] for k in spans)
    assert len(ids) == len(labels) == second[-1] + 1


def test_prompt_for_generation(tok):
    ids = encode_prompt("<image>\nWhat is this?", tok)
    assert ids == _joint(single_turn("What is this?"), tok)
    assert ids[-5:] == [319, 1799, 9047, 13566, 29901]  # ▁A SS IST ANT :
    assert encode_prompt("Hi", tok, has_image=False) == _joint(single_turn("Hi", n_images=0), tok)


def test_text_only_and_trailing_question(tok):
    item = {"id": "t", "conversations": [{"from": "gpt", "value": "skip"}, {"from": "human", "value": "Hi"},
                                         {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "More?"}]}
    ids, labels = encode_conversation(item, tok)
    assert IMAGE_TOKEN_INDEX not in ids
    assert tok.convert_ids_to_tokens([t for t in labels if t != IGNORE_INDEX]) == ["▁Hello", ".", "</s>"]
    with pytest.raises(InputError, match="alternate"):
        encode_conversation({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}, tok)
    with pytest.raises(InputError, match="no assistant reply"):
        encode_conversation({"conversations": [{"from": "human", "value": "a"}]}, tok)


def test_truncate_counts_image_rows():
    ids = [1, 2, IMAGE_TOKEN_INDEX, 3, 4, 5]
    labels = [-100, -100, -100, 3, 4, 5]
    assert truncate(ids, labels, 2 + 10 + 3, 10) == (ids, labels)
    assert truncate(ids, labels, 2 + 10 + 1, 10) == (ids[:4], labels[:4])
    with pytest.raises(InputError, match="cannot hold the image"):
        truncate(ids, labels, 5, 10)


@pytest.fixture(scope="module")
def smol(tiny_llava_smol):
    from factedge.convert.layouts import load_checkpoint
    from factedge.train.model import _tokenizer, training_format

    ckpt = load_checkpoint(tiny_llava_smol.root)
    tok = _tokenizer(ckpt)
    return tok, training_format(ckpt, tok)


def test_chatml_pieces_equal_whole_text(smol):
    """A LLaVA on SmolLM2 trains in ChatML with its template's default system prompt: the piecewise ids
    are the whole text's ids, labels on each reply and its <|im_end|> (the EOS), no BOS."""
    tok, fmt = smol
    assert fmt.name == "chatml" and fmt.default_system.startswith("You are a helpful AI assistant named SmolLM")
    ids, labels = encode_conversation(ITEM, tok, fmt=fmt)
    text = Conversation(None, conversation_turns(ITEM), fmt).text()
    assert pieces_text(turn_pieces(conversation_turns(ITEM), fmt=fmt), fmt) + fmt.after_end == text
    assert text.endswith("<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\nA red circle."
                         "<|im_end|>\n<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\nTwo.<|im_end|>\n")
    assert ids == _joint(text, tok)[:-1]  # the newline after the last <|im_end|> is not part of the sample
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids.count(IMAGE_TOKEN_INDEX) == 1
    targets = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(targets) == "A red circle.<|im_end|>Two.<|im_end|>"
    assert targets.count(tok.eos_token_id) == 2 and tok.eos_token == "<|im_end|>"
    assert encode_prompt("<image>\nWhat is this?", tok, fmt=fmt) == _joint(single_turn("What is this?", fmt=fmt), tok)


def test_chatml_reward_prompt(smol):
    """The fact RM's rating request as a ChatML user turn after the rated answer, read at "is"."""
    import random

    from factedge.train.rm.prompt import SCORE_PREFIX, encode_reward_input, reward_text

    tok, fmt = smol
    item = {"id": "p", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nDescribe."}]}
    text = reward_text(conversation_turns(item), "A red circle.", ["One red circle."], random.Random(0), fmt=fmt)
    assert "<|im_start|>assistant\nA red circle.<|im_end|>\n<|im_start|>user\nPlease evaluate" in text
    assert "captions:\n  - One red circle.\n" in text
    assert text.endswith("concise.<|im_end|>\n<|im_start|>assistant\n" + SCORE_PREFIX)
    ids = encode_reward_input(item, "A red circle.", tok, ["One red circle."], random.Random(0), fmt)
    assert ids == _joint(text, tok) and tok.decode(ids[-1:]) == " is"
