"""The conversation format comes from the model: Vicuna v1 for LLaVA, the GGUF's own template (ChatML
for SmolLM2) otherwise, rendered in a sandbox; the edge's prompt ids are HF's ids of the same chat, and
multi-turn chats, one-shot questions and the batch engine agree on a ChatML bundle."""

from __future__ import annotations

import pytest

from factedge.edge.chat_format import CHATML, VICUNA_V1, detect_format, named_format
from factedge.edge.errors import ConfigError
from factedge.edge.prompt import SYSTEM, VICUNA_JINJA, Conversation, Turn

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def smol_template(tiny_llava_smol_hf) -> str:
    return (tiny_llava_smol_hf.root / "chat_template.jinja").read_text()


def test_vicuna_and_no_template_are_llava_v1():
    fmt = detect_format(VICUNA_JINJA)
    assert fmt.name == "vicuna_v1" and fmt.default_system == SYSTEM
    assert detect_format(None) == VICUNA_V1


def test_smollm2_template_is_chatml_with_its_default_system(smol_template):
    fmt = detect_format(smol_template)
    assert fmt.name == "chatml" and fmt.default_system == SMOL_SYSTEM


def test_rendering_equals_hf_apply_chat_template(tiny_llava_smol_hf, smol_template):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llava_smol_hf.root))
    fmt = detect_format(smol_template)
    turns = [Turn("What is this?", "A red circle.", 1), Turn("And below it?", None, 0)]
    messages = [{"role": "user", "content": "<image>\nWhat is this?"}, {"role": "assistant", "content": "A red circle."},
                {"role": "user", "content": "And below it?"}]
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert Conversation(None, turns, fmt).text() == want
    assert Conversation("Be brief.", turns, fmt).text() == tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}] + messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("template, words", [
    ("{{ messages[0]['content'] }}", "none of the formats factedge knows"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "does not render"),  # the sandbox refuses
    ("{% if", "does not render"),
    ("{{ 'a' * 10**12 }}", "repetition longer than a chat template needs"),  # not 1 TB of memory
    ("{{ [0] * 10**9 }}", "repetition longer than a chat template needs"),
    ("{{ 2 ** (10 ** 7) }}", "exponent 10000000 is too large"),
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "takes over 2 s"),  # not hours
])
def test_unknown_or_hostile_templates_are_refused(template, words):
    with pytest.raises(ConfigError, match=words):
        detect_format(template)


# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template (the hub's text)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def test_llama3_template_is_llama3():
    from factedge.edge.chat_format import render_template

    fmt = detect_format(LLAMA3_TEMPLATE)
    assert fmt.name == "llama3" and fmt.default_system is None and fmt.end == "<|eot_id|>"
    turns = [Turn("What is this?", "A red circle.", 1), Turn("And below it?", None, 0)]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat is this?"},
                {"role": "assistant", "content": "A red circle."}, {"role": "user", "content": "And below it?"}]
    text = Conversation("Be brief.", turns, fmt).text()
    assert text == render_template(LLAMA3_TEMPLATE, messages, True)
    assert text.endswith("<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnd below it?<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_a_named_format_overrides():
    assert named_format("chatml") == CHATML
    with pytest.raises(ConfigError, match="unknown chat format 'alpaca'"):
        named_format("alpaca")


@pytest.fixture(scope="module")
def smol_vision(make_bundle, tiny_llava_smol_hf):
    from factedge.edge.sampling import SamplingOptions
    from factedge.edge.vision_model import ModelOptions, VisionModel

    out = make_bundle(tiny_llava_smol_hf, name="tiny-smol", base_type="f32", quants=[])
    options = ModelOptions(n_ctx=2048, threads=1, sampling=SamplingOptions(max_tokens=12))
    with VisionModel.open(out, options=options) as vision:
        yield vision


def test_prompt_ids_are_hf_ids_of_the_chatml_prompt(smol_vision, tiny_llava_smol_hf):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llava_smol_hf.root))
    assert smol_vision.chat_format.name == "chatml"
    pieces = smol_vision.prompt_ids("What shape is it?")
    text = tok.apply_chat_template([{"role": "user", "content": "<image>\nWhat shape is it?"}], tokenize=False,
                                   add_generation_prompt=True)
    before, after = text.split("<image>")
    assert pieces == [tok(before).input_ids, None, tok(after).input_ids]
    assert tok(before).input_ids[:1] == [tok.convert_tokens_to_ids("<|im_start|>")]  # no BOS: SmolLM2 adds none


def test_multi_turn_chatml_chat_equals_a_fresh_render(smol_vision):
    """The second turn reuses the first's KV and splices its answer ids; a fresh session fed the same
    history as text must give the same answer."""
    from factedge.edge.batch import BatchOptions, BatchSession, Request
    from factedge.edge.chat import ChatSession, SessionOptions
    from factedge.convert.verify import sample_images

    image = sample_images(224)[0][1]
    with ChatSession(smol_vision, SessionOptions(n_ctx=2048)) as chat:
        first = chat.ask("Describe the image.", image)
        second = chat.ask("And the colours?")
    assert first.text and second.text
    with BatchSession(smol_vision, BatchOptions(parallel=2, seq_ctx=1024)) as batch:
        outcomes = batch.answer_all([Request("Describe the image.", image),
                                     Request("And the colours?", None, history=[("Describe the image.", first.text, [image])])])
    assert [o.answer.text for o in outcomes] == [first.text, second.text]
    assert smol_vision.ask("Describe the image.", image).text == first.text
