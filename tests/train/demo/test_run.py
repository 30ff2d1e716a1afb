"""`factedge demo` on a stand-in recipe: the tiny LLaVA-RLHF-layout checkpoint has exactly the folder
shape run_recipe returns (sft_model/ + rlhf_lora_adapter_model/), so conversion, the runtime adapter
switch, the judge, the cache and the CLI are exercised in seconds (answers are random-weight text)."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from factedge.train.demo import run as demo_mod
from factedge.train.demo import demo_cli
from factedge.train.demo.run import DemoOptions, run_demo, should_chat
from factedge.train.demo.items import demo_items, seen_signatures
from factedge.train.world.judge import Verdict, judge


class StandIn:
    """run_recipe's contract over the cached tiny checkpoint; counts calls and reports 'cached' after one."""

    def __init__(self, cache: Path):
        self.cache, self.calls = cache, 0

    def __call__(self, cache_dir, progress, log):
        from factedge.train.base.tiny_cache import cached_tiny

        self.calls += 1
        tiny = cached_tiny("llava-rlhf", image_size=224, cache_dir=self.cache)
        return SimpleNamespace(root=Path(tiny.root), world=None, metrics={"stand_in": 1.0}, cached=self.calls > 1)


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory):
    from factedge.train.base.tiny_cache import default_cache_dir

    recipe = StandIn(default_cache_dir())
    options = DemoOptions(cache_dir=tmp_path_factory.mktemp("demo"), n_images=2, max_tokens=12, verify=False)
    first = run_demo(options, recipe=recipe)
    converts = []
    real = demo_mod.convert_checkpoint
    demo_mod.convert_checkpoint = lambda *a, **k: converts.append(a) or real(*a, **k)
    try:
        second = run_demo(options, recipe=recipe)
    finally:
        demo_mod.convert_checkpoint = real
    return first, second, converts


def test_rows_hold_both_answers_and_verdicts(demo_runs):
    first, _, _ = demo_runs
    assert first.trained and first.converted and first.quant == "Q4_K_M"
    assert len(first.rows) == 4 and len(first.images) == 2
    assert [r.qtype == "describe" for r in first.rows] == [True, False, True, False]
    assert all(r.qtype in ("yes_no", "multiple_choice") for r in first.rows[1::2])
    manifest = (first.bundle / "manifest.json").read_text()
    assert '"adapter"' in manifest and "Q4_K_M" in manifest and "Q8_0" in manifest
    # the adapter changes the answers: RLHF (scale 1) is not the SFT base (scale 0)
    assert any(r.sft != r.rlhf for r in first.rows)
    for r in first.rows:
        assert r.sft and r.rlhf
        scene = next(i.scene for i in demo_items(first.bundle / "demo-images", 2, first_seed(), None)
                     if i.image == r.image)
        assert r.sft_verdict == judge(scene, r.sft, r.question)
        assert r.rlhf_verdict == judge(scene, r.rlhf, r.question)
        assert 0 <= r.sft_verdict.score <= 6 and r.sft_verdict.hallucinated == (r.sft_verdict.score < 3)
    table = _render(demo_cli.answers_table(first))
    for r in first.rows:
        assert r.sft[:8] in table and r.rlhf[:8] in table
        assert demo_cli.verdict_text(r.sft_verdict)[:9] in table
    # an 80-column terminal: no line overflows and the answers wrap at spaces, never inside a word
    narrow = _render(demo_cli.answers_table(first), width=80)
    assert max(len(line) for line in narrow.splitlines()) <= 80
    for r in first.rows:
        text = " ".join([r.sft, r.rlhf, demo_cli.verdict_text(r.sft_verdict), demo_cli.verdict_text(r.rlhf_verdict)])
        broken = [w for w in text.split() if len(w) < 20 and w not in narrow]
        assert not broken, broken
    n_sft = sum(r.sft_verdict.hallucinated for r in first.rows)
    assert first.hallucination_rate("sft") == n_sft / 4
    assert f"SFT {n_sft / 4:.0%}" in demo_cli.summary_line(first)


def first_seed() -> int:
    return DemoOptions().seed


def test_cached_run_neither_retrains_nor_reconverts(demo_runs):
    first, second, converts = demo_runs
    assert converts == []
    assert not second.trained and not second.converted
    assert second.bundle == first.bundle
    assert [(r.sft, r.rlhf) for r in second.rows] == [(r.sft, r.rlhf) for r in first.rows]  # greedy, same images
    assert set(second.timings) >= {"convert_s", "total_s"}  # timings are reported (bench: BENCHMARKS.md)
    assert second.runtime["threads"] >= 1 and second.runtime["n_gpu_layers"] in (0, -1)


def test_demo_images_are_fresh_and_deterministic(small_world, tmp_path):
    a = demo_items(tmp_path / "a", 5, 11, small_world)
    b = demo_items(tmp_path / "b", 5, 11, small_world)
    assert [(i.qa.question, i.scene) for i in a] == [(i.qa.question, i.scene) for i in b]
    assert (tmp_path / "a" / "demo-11-0.png").read_bytes() == (tmp_path / "b" / "demo-11-0.png").read_bytes()
    seen = seen_signatures(small_world)
    assert len(seen) >= 12 and not {i.scene.signature() for i in a} & seen
    # the world's image size is used (64 px in the fixture world)
    from PIL import Image

    assert Image.open(a[0].image).size == (64, 64)
    # every reference answer is right by the judge, so the judge can tell a right answer from a wrong one
    assert all(not judge(i.scene, i.qa.answer, i.qa.question).hallucinated for i in a)


def test_verdict_text():
    assert demo_cli.verdict_text(Verdict(["a red square"], [], False, 5)) == "score 5/6, ok"
    assert demo_cli.verdict_text(Verdict(["a red square", "two circles"], ["a red square", "two circles"], True, 1)) \
        == "score 1/6, hallucinated: a red square; two circles"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_should_chat_only_on_a_terminal():
    assert should_chat(False, _Tty(), _Tty())
    assert not should_chat(True, _Tty(), _Tty())
    assert not should_chat(False, io.StringIO(), _Tty())
    assert not should_chat(False, _Tty(), io.StringIO())
    assert not should_chat(False, object(), _Tty())


def test_cli_no_chat_when_not_a_tty_and_chat_reuses_factedge_chat(demo_runs, monkeypatch):
    first, _, _ = demo_runs
    monkeypatch.setattr(demo_cli, "run_demo", lambda *a, **k: first)
    result = CliRunner().invoke(demo_cli.demo, [], input="hello\n")
    assert result.exit_code == 0, result.output
    assert f"factedge chat --model {first.bundle}" in result.output.replace("\n", "")
    assert "hallucination rate over 4 answers on 2 fresh images" in result.output
    assert "commands:" not in result.output  # no REPL: stdin is not a terminal
    # on a terminal the demo hands over to `factedge chat` with the first image attached
    monkeypatch.setattr(demo_cli, "should_chat", lambda *a: True)
    result = CliRunner().invoke(demo_cli.demo, [], input="/quit\n")
    assert result.exit_code == 0, result.output
    assert "commands:" in result.output and f"image {first.images[0].name} attached" in result.output


def _render(table, width: int = 400) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=width)
    console.print(table)
    return console.file.getvalue()


def test_heldout_figures_are_the_judged_one_at_a_time_answers(demo_runs, small_world):
    """Both models answer the held-out split through the bundle (batch engine); the figures are
    score_answers of the answers VisionModel.ask gives one at a time at adapter scale 0 and 1."""
    from factedge.edge.sampling import SamplingOptions
    from factedge.edge.vision_model import ModelOptions, VisionModel
    from factedge.train.demo.heldout import heldout_figures
    from factedge.train.heldout_eval import heldout_items, question_of, score_answers

    first, _, _ = demo_runs
    root = small_world.heldout.root
    runtime = {"threads": 1, "n_gpu_layers": 0}
    got = heldout_figures(first.bundle, root, quant="Q4_K_M", limit=0, max_tokens=8, runtime=runtime)
    items = heldout_items(root)
    assert got["n"] == len(items) >= 2
    for name, scale in (("sft", 0.0), ("rlhf", 1.0)):
        options = ModelOptions(n_ctx=1024, threads=1, adapter_scale=scale)
        with VisionModel.open(first.bundle, quant="Q4_K_M", options=options) as vision:
            answers = [vision.ask(question_of(it), root / "images" / it["image"], SamplingOptions(max_tokens=8))
                       for it in items]
        want = score_answers(root, items, [(a.text, len(a.tokens), a.finish_reason == "stop") for a in answers])
        assert got[name] == pytest.approx(want, nan_ok=True)


def test_heldout_lines_say_plainly_when_rlhf_does_not_help():
    def result(sft, rlhf, base="tiny"):
        figs = lambda rate, cov: {"hallucination_rate": rate, "coverage": cov, "claim_precision": 0.5}  # noqa: E731
        return SimpleNamespace(quant="Q4_K_M", heldout={"n": 200, "sft": figs(*sft), "rlhf": figs(*rlhf)}, base=base)

    same = demo_cli.heldout_lines(result((0.655, 0.234), (0.650, 0.230)))
    assert "SFT hallucination 65.5%" in same[0] and "RLHF (PPO + fact RM) hallucination 65.0%" in same[0]
    assert len(same) == 2 and "does not lower hallucination" in same[1]
    says_less = demo_cli.heldout_lines(result((0.655, 0.234), (0.400, 0.100)))  # fewer errors by saying less
    assert len(says_less) == 2
    assert len(demo_cli.heldout_lines(result((0.655, 0.234), (0.540, 0.230)))) == 1  # a real drop: no caveat
    assert demo_cli.heldout_lines(SimpleNamespace(quant="Q4_K_M", heldout={})) == []
    smol = demo_cli.heldout_lines(result((0.655, 0.234), (0.650, 0.230), "smol"))
    assert len(smol) == 2 and "SmolLM2" in smol[1] and "SFT budget" not in smol[1]  # the tiny base's account is not its


def test_demo_bases():
    from factedge.edge.errors import ConfigError
    from factedge.train.demo.run import BASES, default_recipe

    assert BASES == {"tiny": "llama", "smol": "smollm2"}
    with pytest.raises(ConfigError, match="base must be one of tiny, smol"):
        default_recipe("micro", "gpt2")
