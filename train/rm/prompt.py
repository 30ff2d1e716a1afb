"""The (fact-augmented) reward prompt of LLaVA-RLHF, text for text.

The reward model reads: the conversation with the candidate response as the last assistant turn
(`... ASSISTANT: <response></s>`), then a space and a second user turn asking to rate that response
as accurate, helpful, natural and concise, and an assistant turn pre-filled up to "... the quality
score of my last response is"; the score is read at that last token. In the fact-augmented form
the accuracy criterion is followed by FACTUAL_PROMPT and one `  - <fact>` line per fact (the 5
captions of the image; for A-OKVQA the answer and rationales), shuffled per example. Texts are the
ones in LLaVA-RLHF's `RLHF/prompts/{fact_rlhf_,}reward_prompt.txt` and `FACTUAL_PROMPT`. The turns are
written in the model's chat format (edge.chat_format): Vicuna v1 gives the paper's text exactly
(including its space after `</s>`); a ChatML model gets the same request as a ChatML user turn.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from factedge.edge.chat_format import TEXT, VICUNA_V1, ChatFormat
from factedge.edge.prompt import Turn
from factedge.train.conversation import Piece, conversation_turns, encode_pieces, pieces_text, turn_pieces

FACTUAL_PROMPT = ("Specifically, the AI's response should be fully supported by the combination of the following "
                  "captions:\n")
SCORE_PREFIX = "Following your definitions, the quality score of my last response is"
_CRITERIA = (
    "Please evaluate the quality of your last response. There are several dimensions you should "
    "consider in your evaluation:\n\n"
    "1. Accurate: The AI should provide factual and accurate information from the image, and refrain from "
    "making statements that are not supported by the image or inconsistent with the image.{facts}\n"
    "2. Helpful: The AI\u2019s response should precisely serve the user's needs and interests, while grounding "
    "the response in the image.\n"
    "3. Language Natural: The AI should employ language that flows smoothly and is free from repetitive or "
    "awkward constructs.\n"
    "4. Concise: The AI should efficiently address the task or answer the question, communicating the "
    "necessary information with brevity and clarity.\n\n"
    "A good response should be accurate, helpful, language natural, and concise."
)
# what joins the rated answer's end token to the rating turn: LLaVA-RLHF writes "</s> USER: ..."
RATING_JOIN = {VICUNA_V1.name: " "}


def fact_block(facts: Sequence[str]) -> str:
    """FACTUAL_PROMPT then `  - <fact>\\n` per fact (in the order given)."""
    return FACTUAL_PROMPT + "".join(f"  - {fact}\n" for fact in facts)


def rating_request(facts: Sequence[str] | None = None, rng: random.Random | None = None,
                   fmt: ChatFormat = VICUNA_V1) -> str:
    """The second user turn + pre-filled assistant text. `facts=None`: the plain prompt; otherwise
    the facts are shuffled with `rng` (a copy of the list; `rng=None` keeps their order)."""
    if facts is None:
        body = _CRITERIA.format(facts="")
    else:
        facts = list(facts)
        if rng is not None:
            rng.shuffle(facts)
        body = _CRITERIA.format(facts=" " + fact_block(facts))
    return fmt.user.replace(TEXT, body) + fmt.assistant + fmt.answer_lead + SCORE_PREFIX


def reward_pieces(turns: Sequence[Turn], response: str, facts: Sequence[str] | None = None,
                  rng: random.Random | None = None, system: str | None = None,
                  fmt: ChatFormat = VICUNA_V1) -> list[Piece]:
    """The conversation (`turns`, the last one answered by `response`), then the rating request."""
    turns = list(turns)
    last = turns[-1]
    turns[-1] = Turn(last.user, response, last.n_images)
    pieces = turn_pieces(turns, system, fmt)
    join = fmt.after_end + RATING_JOIN.get(fmt.name, "")
    return pieces + [Piece(join + rating_request(facts, rng, fmt))]


def reward_text(turns: Sequence[Turn], response: str, facts: Sequence[str] | None = None,
                rng: random.Random | None = None, system: str | None = None, fmt: ChatFormat = VICUNA_V1) -> str:
    """The whole reward-model input as text (what LLaVA-RLHF tokenises), the end token written out."""
    return pieces_text(reward_pieces(turns, response, facts, rng, system, fmt), fmt)


def encode_reward_input(item: dict[str, Any], response: str, tokenizer, facts: Sequence[str] | None = None,
                        rng: random.Random | None = None, fmt: ChatFormat = VICUNA_V1) -> list[int]:
    """Token ids (IMAGE_TOKEN_INDEX for the image) of the reward input for `item`'s conversation
    with its last assistant reply replaced by `response` (a prompt-only item gets one added).
    The reward is read at the last id."""
    turns = conversation_turns(item)
    ids, _ = encode_pieces(reward_pieces(turns, response, facts, rng, fmt=fmt), tokenizer, fmt=fmt)
    return ids
