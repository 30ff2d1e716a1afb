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

That is the default form, "paper". A second form, "verify", asks the question a small pretrained LM
can answer zero-shot. It is one user turn: the image, the captions, then the rated exchange quoted as
"Question: ... Answer: ...", then "Is the answer fully supported by the captions? Answer Yes or No.";
the score is read where the reply would start. Measured on SmolLM2-135M (BENCHMARKS.md): this ranks
equal-length pairs about 0.75 zero-shot; the paper's long request 0.47, and the same question asked
after the conversation (the response above, not below, the captions) 0.37-0.53. Each form names the
two words whose logit difference is its zero-shot verdict (rm.model.reading_head).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from factedge.edge.chat_format import TEXT, VICUNA_V1, ChatFormat
from factedge.edge.errors import ConfigError
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
VERIFY_FACTS = ("Captions:\n{facts}Question: {question}\nAnswer: {response}\nIs the answer fully supported by the "
                "captions? Answer Yes or No.")
VERIFY_PLAIN = "Question: {question}\nAnswer: {response}\nIs the answer accurate? Answer Yes or No."


@dataclass(frozen=True)
class RewardForm:
    """A rating request: its user text (with and without facts), the assistant text pre-filled before
    the score position ("" reads the score where the answer starts) and the (good, bad) verdict words."""

    name: str
    fact_body: str  # "{facts}": the fact lines; "{question}", "{response}": the rated exchange
    plain_body: str
    prefill: str
    words: tuple[str, str]
    standalone: bool = False  # the request replaces the conversation (it quotes the rated exchange)


REWARD_FORMS: dict[str, RewardForm] = {f.name: f for f in (
    RewardForm("paper", _CRITERIA.replace("{facts}", " " + FACTUAL_PROMPT + "{facts}"), _CRITERIA.format(facts=""),
               SCORE_PREFIX, ("high", "low")),
    RewardForm("verify", VERIFY_FACTS, VERIFY_PLAIN, "", ("Yes", "No"), standalone=True),
)}


def reward_form(name: str) -> RewardForm:
    if name not in REWARD_FORMS:
        raise ConfigError(f"unknown reward prompt form {name!r} (known: {', '.join(REWARD_FORMS)})")
    return REWARD_FORMS[name]


# what joins the rated answer's end token to the rating turn: LLaVA-RLHF writes "</s> USER: ..."
RATING_JOIN = {VICUNA_V1.name: " "}


def fact_lines(facts: Sequence[str]) -> str:
    """`  - <fact>\\n` per fact, in the order given (what follows FACTUAL_PROMPT in the paper's form)."""
    return "".join(f"  - {fact}\n" for fact in facts)


def request_body(form: str, facts: Sequence[str] | None = None, rng: random.Random | None = None,
                 question: str = "", response: str = "") -> str:
    """The rating request's user text. `facts=None`: the plain prompt; otherwise the facts are
    shuffled with `rng` (a copy of the list; `rng=None` keeps their order)."""
    spec = reward_form(form)
    if facts is None:
        body = spec.plain_body
    else:
        facts = list(facts)
        if rng is not None:
            rng.shuffle(facts)
        body = spec.fact_body.replace("{facts}", fact_lines(facts))
    return body.replace("{question}", question).replace("{response}", response)


def rating_request(facts: Sequence[str] | None = None, rng: random.Random | None = None,
                   fmt: ChatFormat = VICUNA_V1, form: str = "paper") -> str:
    """The (second) user turn + pre-filled assistant text, ending at the score position."""
    spec = reward_form(form)
    prefill = fmt.answer_lead + spec.prefill if spec.prefill else ""
    return fmt.user.replace(TEXT, request_body(form, facts, rng)) + fmt.assistant + prefill


def verdict_text(word: str, fmt: ChatFormat, form: str) -> str:
    """How a verdict word is written right after the score position: after the paper's prefix a
    space and the word; at an answer's start the format's lead (Vicuna " ", ChatML none)."""
    return (" " if reward_form(form).prefill else fmt.answer_lead) + word


def reward_pieces(turns: Sequence[Turn], response: str, facts: Sequence[str] | None = None,
                  rng: random.Random | None = None, system: str | None = None,
                  fmt: ChatFormat = VICUNA_V1, form: str = "paper") -> list[Piece]:
    """The conversation (`turns`, the last one answered by `response`), then the rating request; a
    standalone form: one turn with the conversation's images and the request quoting the exchange."""
    turns = list(turns)
    last = turns[-1]
    if reward_form(form).standalone:
        body = request_body(form, facts, rng, last.user, response)
        return turn_pieces([Turn(body, None, sum(t.n_images for t in turns))], system, fmt)
    turns[-1] = Turn(last.user, response, last.n_images)
    pieces = turn_pieces(turns, system, fmt)
    join = fmt.after_end + RATING_JOIN.get(fmt.name, "")
    return pieces + [Piece(join + rating_request(facts, rng, fmt, form))]


def reward_text(turns: Sequence[Turn], response: str, facts: Sequence[str] | None = None,
                rng: random.Random | None = None, system: str | None = None, fmt: ChatFormat = VICUNA_V1,
                form: str = "paper") -> str:
    """The whole reward-model input as text (what LLaVA-RLHF tokenises), the end token written out."""
    return pieces_text(reward_pieces(turns, response, facts, rng, system, fmt, form), fmt)


def encode_reward_input(item: dict[str, Any], response: str, tokenizer, facts: Sequence[str] | None = None,
                        rng: random.Random | None = None, fmt: ChatFormat = VICUNA_V1, form: str = "paper") -> list[int]:
    """Token ids (IMAGE_TOKEN_INDEX for the image) of the reward input for `item`'s conversation
    with its last assistant reply replaced by `response` (a prompt-only item gets one added).
    The reward is read at the last id."""
    turns = conversation_turns(item)
    ids, _ = encode_pieces(reward_pieces(turns, response, facts, rng, fmt=fmt, form=form), tokenizer, fmt=fmt)
    return ids
