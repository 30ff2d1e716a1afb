"""`factedge ask` (VisionModel) and `factedge chat` (ChatSession) tokenise a prompt identically.

Before, ask tokenised with special=False and chat with special=True, so a question containing the
text "</s>" gave different ids (and so different answers) in the two commands. Both now go through
`edge.prompt.prompt_pieces`; these tests pin the ids: one BOS at position 0, the image in the same
place, a literal "</s>" read as EOS by both, and the template's "</s>" after an answer as one EOS.
Needs the patched native build; skipped without it.
"""

from __future__ import annotations

import numpy as np
import pytest

BOS, EOS = 1, 2
IMAGE = np.random.default_rng(3).integers(0, 256, (60, 80, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def vision(native_tools, make_bundle, tiny_llava_rlhf):
    from factedge.edge.sampling import SamplingOptions
    from factedge.edge.vision_model import ModelOptions, VisionModel

    out = make_bundle(tiny_llava_rlhf, name="tiny-rlhf")
    with VisionModel.open(out, options=ModelOptions(n_ctx=1024, threads=1,
                                                  sampling=SamplingOptions(max_tokens=4))) as vc:
        yield vc


def _flat(pieces, n_rows: int) -> list:
    """Token ids with each image expanded to its rows (None per row), as the KV cache lays them out."""
    out: list = []
    for p in pieces:
        out.extend([None] * n_rows if p is None else p)
    return out


def _kv_as_ids(kv) -> list:
    return [None if isinstance(k, tuple) else k for k in kv]


@pytest.mark.parametrize("question", ["What is in the image?", "Is </s> an end tag? Answer: yes"])
def test_ask_and_chat_feed_the_same_ids(vision, question):
    from factedge.edge.chat import ChatSession

    ask_ids = vision.prompt_ids(question, n_images=1)
    with ChatSession(vision) as chat:
        turn = chat.ask(question, IMAGE).stats
        chat_ids = _kv_as_ids(chat.kv_tokens[: turn.prompt_total])
    n_rows = vision.encoder.encode(np.zeros((224, 224, 3), np.uint8)).shape[0]
    assert _flat(ask_ids, n_rows) == chat_ids
    assert chat_ids[0] == BOS and chat_ids.count(BOS) == 1  # BOS once, on the first piece only
    assert chat_ids.count(None) == n_rows == 256  # one image, 224 px / 14 -> 16 x 16 rows
    assert (EOS in chat_ids) == ("</s>" in question)  # a literal "</s>" is EOS in both commands


def test_history_separator_is_one_eos_and_no_second_bos(vision):
    from factedge.edge.chat import ChatSession

    with ChatSession(vision) as chat:
        first = chat.ask("What is in the image?", IMAGE)
        n1 = first.stats.prompt_total
        chat.ask("And the colour?")
        kv = _kv_as_ids(chat.kv_tokens)
    tail = kv[n1:]
    assert kv.count(BOS) == 1
    # after turn 1's prompt: its answer ids, then the template's "</s>" as the single EOS id
    answer = chat.turns[0].answer_ids or []
    assert tail[: len(answer)] == answer and EOS in tail
    assert tail.index(EOS) >= len(answer)
