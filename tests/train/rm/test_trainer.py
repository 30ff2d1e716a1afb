"""Reward model: LLaVA-RLHF's reward prompt text for text, Bradley-Terry loss by hand, the score read
at the last token whatever the padding, save/load, and a short training run."""

from __future__ import annotations

import math
import random

import pytest
import torch

from factedge.edge.chat_format import CHATML
from factedge.edge.errors import ConfigError
from factedge.edge.prompt import SYSTEM
from factedge.train.config import LoraSettings, load_config
from factedge.train.rm.config import RMConfig
from factedge.train.conversation import conversation_turns
from factedge.train.model import IMAGE_TOKEN_INDEX
from factedge.train.rm.model import HEAD_FILE, RewardModel, score_token
from factedge.train.rm.prompt import encode_reward_input, rating_request, reward_form, reward_text
from factedge.train.rm.trainer import pairwise_loss, train_rm
from factedge.train.run_dir import iter_metrics

torch.set_num_threads(2)

# LLaVA-RLHF RLHF/prompts/fact_rlhf_reward_prompt.txt and data_utils/constants.py FACTUAL_PROMPT, verbatim
FACT_FILE = (
    "USER: Please evaluate the quality of your last response. There are several dimensions you should consider "
    "in your evaluation:\n\n1. Accurate: The AI should provide factual and accurate information from the image, "
    "and refrain from making statements that are not supported by the image or inconsistent with the image. "
    "{factual_prompt}\n2. Helpful: The AI’s response should precisely serve the user's needs and interests, while "
    "grounding the response in the image.\n3. Language Natural: The AI should employ language that flows smoothly "
    "and is free from repetitive or awkward constructs.\n4. Concise: The AI should efficiently address the task "
    "or answer the question, communicating the necessary information with brevity and clarity.\n\nA good response "
    "should be accurate, helpful, language natural, and concise. ASSISTANT: Following your definitions, the "
    "quality score of my last response is")
FACTUAL = "Specifically, the AI's response should be fully supported by the combination of the following captions:\n"
ITEM = {"id": "p", "image": "0000000.png", "conversations": [
    {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "ignored"}],
    "output_1": {"value": "A red circle."}, "output_2": {"value": "A blue square."}, "preference": 1}
FACTS = ["A red circle on grey.", "One red circle.", "A small red circle in the middle."]


def test_fact_prompt_exact_text():
    shuffled = list(FACTS)
    random.Random(7).shuffle(shuffled)
    fact_lines = FACTUAL + "".join(f"  - {c}\n" for c in shuffled)
    want = (f"{SYSTEM} USER: <image>\nDescribe the image. ASSISTANT: A red circle.</s>"
            + " " + FACT_FILE.format(factual_prompt=fact_lines))
    assert reward_text(conversation_turns(ITEM), "A red circle.", FACTS, random.Random(7)) == want
    assert "  - A small red circle in the middle.\n" in want and "image. Specifically" in want
    plain = FACT_FILE.replace(" {factual_prompt}", "")  # LLaVA-RLHF's reward_prompt.txt
    assert rating_request(None) == plain and "captions" not in plain
    assert rating_request(FACTS) == FACT_FILE.format(factual_prompt=FACTUAL + "".join(f"  - {c}\n" for c in FACTS))
    assert FACTS == ["A red circle on grey.", "One red circle.", "A small red circle in the middle."]  # not mutated


def test_reward_ids_end_at_the_score_position(small_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(small_base), legacy=True)
    ids = encode_reward_input(ITEM, "A red circle.", tok, FACTS, random.Random(1))
    text = reward_text(conversation_turns(ITEM), "A red circle.", FACTS, random.Random(1))
    head, tail = text.split("<image>")
    assert ids == tok(head).input_ids + [IMAGE_TOKEN_INDEX] + tok(tail, add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids[-2:]) == ["▁response", "▁is"]  # the score is read at "is"
    assert ids.count(2) == 1  # the response's </s>; nothing after "is"


def test_pairwise_loss_hand_worked():
    r1, r2 = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 2.0, 0.5])
    pref = torch.tensor([1, 2, 1])
    loss, acc = pairwise_loss(r1, r2, pref, centering_coef=1e-3)
    # logits r2-r1 = [-1, 2, 0]; targets [0, 1, 0]
    # BCE: log(1+e^-1) = 0.3132617, log(1+e^-2) = 0.1269280, log 2 = 0.6931472 -> mean 0.3777790
    # centring: 1e-3 * |mean(r1+r2)| = 1e-3 * |(1 + 2 + 1) / 3| = 0.0013333
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(-2)) + math.log(2)) / 3
                                        + 1e-3 * 4 / 3, abs=1e-6)
    assert loss.item() == pytest.approx(0.3791123, abs=1e-6)
    assert acc.item() == pytest.approx(2 / 3)  # the tie (logit 0) predicts "2 is better": wrong for pair 3
    loss0, _ = pairwise_loss(r1, r2, pref, centering_coef=0.0)
    assert loss0.item() == pytest.approx(0.3777790, abs=1e-6)


def test_score_at_last_token_any_padding(fresh_model, small_world, tmp_path):
    model = fresh_model(attn_implementation="eager")
    rm = RewardModel.create(model, LoraSettings(r=4))
    assert torch.equal(rm.head.bias, torch.zeros(1))
    with torch.no_grad():
        for p in model.lm.parameters():  # a non-zero LoRA B, so that save/load is tested for real
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    image = small_world.images / "0000000.png"
    tok = model.tokenizer
    short = encode_reward_input(ITEM, "A red circle.", tok, None)
    long = encode_reward_input(ITEM, "A blue square and a green triangle, both large.", tok, FACTS)
    with torch.no_grad():
        both = rm.score([short, long], [image, image])
        alone = rm.score([short], [image])
        emb = model.embed_images([image])
        sp = model.splice([short], emb)
        manual = rm.head(model.hidden_states(sp)[0, -1]).item()
    assert both[0].item() == pytest.approx(alone.item(), abs=1e-5) == pytest.approx(manual, abs=1e-5)
    rm.head.bias.data.fill_(0.25)
    out = rm.save(tmp_path / "rm", base=model.ckpt.root)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", HEAD_FILE]
    with torch.no_grad():
        want = rm.score([short, long], [image, image])
    fresh = fresh_model(attn_implementation="eager")
    loaded = RewardModel.load(fresh, out)
    # adapter, head and base LM frozen (the projector is the caller's to freeze or train)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad and not n.startswith("model.projector.")] == []
    with torch.no_grad():
        got = loaded.score([short, long], [image, image])
    assert torch.allclose(got, want, atol=1e-5)


def test_verify_form_quotes_the_exchange_in_one_turn():
    text = reward_text(conversation_turns(ITEM), "A red circle.", FACTS[:2], fmt=CHATML, form="verify")
    assert text == ("<|im_start|>user\n<image>\nCaptions:\n  - A red circle on grey.\n  - One red circle.\n"
                    "Question: Describe the image.\nAnswer: A red circle.\nIs the answer fully supported by the "
                    "captions? Answer Yes or No.<|im_end|>\n<|im_start|>assistant\n")
    plain = reward_text(conversation_turns(ITEM), "A red circle.", None, system="", form="verify")
    assert plain == (" USER: <image>\nQuestion: Describe the image.\nAnswer: A red circle.\nIs the answer accurate? "
                     "Answer Yes or No. ASSISTANT:")
    with pytest.raises(ConfigError, match="unknown reward prompt form"):
        rating_request(form="short")
    with pytest.raises(ConfigError, match="unknown reward prompt form 'short'"):  # before any model loads
        train_rm(RMConfig(data="absent.json", use_facts=False, prompt_form="short"))


@pytest.mark.parametrize("form,words", [("paper", ["\u2581high", "\u2581low"]), ("verify", ["\u2581Yes", "\u2581No"])])
def test_reading_head_is_the_lms_own_verdict(fresh_model, small_world, tmp_path, form, words):
    """reading_head: before any training the reward is the LM's logit(good) - logit(bad) at the score
    position ("... my last response is" high/low; "ASSISTANT:" Yes/No), to float precision; the form
    travels with the saved head."""
    model = fresh_model(attn_implementation="eager")
    rm = RewardModel.create(model, LoraSettings(r=4), form=form, reading=True)
    tok = model.tokenizer
    good, bad = (score_token(tok, w, model.chat_format, form) for w in reward_form(form).words)
    assert tok.convert_ids_to_tokens([good, bad]) == words  # SentencePiece: the word after a space
    image = small_world.images / "0000000.png"
    ids = [encode_reward_input(ITEM, text, tok, FACTS, fmt=model.chat_format, form=form)
           for text in ("A red circle.", "A blue square.")]
    with torch.no_grad():
        scores = rm.score(ids, [image, image])
        for row, score in zip(ids, scores):
            logits = model(model.splice([row], model.embed_images([image])))[0, -1]
            assert score.item() == pytest.approx((logits[good] - logits[bad]).item(), abs=1e-4)
    assert RewardModel.load(fresh_model(), rm.save(tmp_path / "rm", base=model.ckpt.root)).form == form
    with pytest.raises(ConfigError, match="not one token"):
        score_token(tok, "qzxvhigh", model.chat_format, form)


@pytest.mark.parametrize("use_facts", [True, False])
def test_train_rm_two_steps(small_base, small_world, tmp_path, use_facts):
    cfg = load_config(RMConfig, None, [
        "--model.base", str(small_base), "--data", str(small_world.preference), "--facts", str(small_world.captions),
        "--use_facts", str(use_facts), "--run.out", str(tmp_path / "rm"), "--lora.r", "4", "--eval_size", "4",
        "--optim.batch_size", "4", "--optim.micro_batch_size", "2", "--optim.max_steps", "2", "--optim.lr", "1e-3",
        "--optim.warmup_ratio", "0"])
    result = train_rm(cfg)
    rows = iter_metrics(result.run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert 0.0 <= rows[-1]["eval_accuracy"] <= 1.0 and "eval_loss" in rows[-1] and rows[0]["loss"] > 0
    assert sorted(p.name for p in result.output.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                               HEAD_FILE]
    from safetensors.torch import load_file

    trained = load_file(str(result.run_dir / "checkpoints" / "step-2" / "trainable.safetensors"))
    assert sorted(trained)[:2] == ["head.bias", "head.weight"] and len(trained) == 2 + 2 * 7 * 2
    assert trained["head.bias"].item() != 0.0
    assert all("lora_" in k or k.startswith("head.") for k in trained)


def test_evaluation_reports_equal_length_accuracy():
    """Accuracy on pairs whose outputs have as many words, where a length shortcut scores 50%."""
    from types import SimpleNamespace

    from factedge.train.rm.trainer import Pair, evaluate_pairs

    def pair(a, b, pref):
        return Pair({"output_1": {"value": a}, "output_2": b, "preference": pref}, None, None)

    pairs = [pair("a red circle", "a blue circle", 1), pair("one big square", {"value": "one small square"}, 2),
             pair("a red circle", "a circle", 1), pair("two squares", "one red square", 2)]
    r1, r2 = torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([0.0, 0.5, 0.0, 1.0])  # wrong only on pair 2
    scores = iter([(r1, r2, 0)])
    scorer = SimpleNamespace(rm=SimpleNamespace(eval=lambda: None), cfg=SimpleNamespace(centering_coef=0.0),
                             rewards=lambda module, chunk, seeds: next(scores))
    out = evaluate_pairs(scorer, pairs, seed=0)
    assert out["eval_accuracy"] == pytest.approx(3 / 4)
    assert out["eval_same_length_pairs"] == 2 and out["eval_accuracy_same_length"] == pytest.approx(1 / 2)
