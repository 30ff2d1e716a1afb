"""`factedge eval pope | mmhal | fidelity` end to end on a tiny bundle (random weights: the answers are
noise, so the tests check structure and that every figure follows from the per-item records)."""

from __future__ import annotations

import json

import pytest

from factedge.edge.cli import run
from factedge.train.evaluate.pope import PopeMetrics, parse_yes_no

pytest.importorskip("factedge.train.world.render")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """4 rendered scenes; POPE probes (one present, one absent object each) in two split files;
    8 MMHal items whose scenes are in scenes.json (as `factedge data shapes-mmhal` keys them)."""
    from factedge.train.world.render import render
    from factedge.train.world.scene import scene_for

    root = tmp_path_factory.mktemp("shapes")
    (root / "images").mkdir()
    scenes = {}
    for i in range(4):
        scene = scene_for(100 + i)
        scenes[f"img{i}"] = scene.to_dict()
        render(scene, 96).save(root / "images" / f"img{i}.png")
    absent = ("purple", "star")  # never drawn
    for split in ("random", "adversarial"):
        rows = []
        for i, s in enumerate(scenes.values()):
            o = s["objects"][0]
            rows.append({"question_id": 2 * i, "image": f"img{i}.png", "label": "yes",
                         "text": f"Is there a {o['color']} {o['shape']} in the image?"})
            rows.append({"question_id": 2 * i + 1, "image": f"img{i}.png", "label": "no",
                         "text": f"Is there a {absent[0]} {absent[1]} in the image?"})
        (root / f"shapes_pope_{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    questions = ["What colour is the circle?", "Is there a star in the image?", "Which is larger?",
                 "How many objects are there?", "What is on the left?", "What is the background colour?",
                 "Describe the image.", "What shapes are there?"]
    items = [{"question": q, "image_src": f"https://example.invalid/img{k % 4}.png", "image_id": f"img{k % 4}",
              "image_content": [o["shape"] for o in scenes[f"img{k % 4}"]["objects"]], "gt_answer": "-"}
             for k, q in enumerate(questions)]
    (root / "mmhal.json").write_text(json.dumps(items))
    (root / "scenes.json").write_text(json.dumps(scenes))
    return root


@pytest.fixture(scope="module")
def bundle(make_bundle, tiny_llava_rlhf):
    return make_bundle(tiny_llava_rlhf, name="tiny-rlhf")


def test_pope_compare_with_torch(shapes, bundle, tiny_llava_rlhf, tmp_path):
    out = tmp_path / "pope.json"
    code = run(["eval", "pope", str(shapes / "shapes_pope_random.jsonl"), str(shapes / "shapes_pope_adversarial.jsonl"),
                "--compare", f"{bundle}:F16,{bundle}:Q8_0", "--torch", str(tiny_llava_rlhf.root),
                "--max-tokens", "6", "--threads", "1", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert (doc["schema"], doc["benchmark"]) == (1, "pope")
    assert [r["backend"]["quant"] for r in doc["runs"]] == ["PyTorch", "F16", "Q8_0"]
    assert doc["runs"][0]["backend"]["kind"] == "torch" and doc["runs"][1]["backend"]["size_bytes"] > \
        doc["runs"][2]["backend"]["size_bytes"]
    for r in doc["runs"]:
        res = r["result"]
        assert set(res) == {"metrics", "records", "speed"} and list(res["metrics"]) == ["random", "adversarial", "all"]
        recs = res["records"]
        assert len(recs) == 16 and all(x["pred"] == parse_yes_no(x["answer"]) for x in recs)
        for split, m in res["metrics"].items():
            mine = [x for x in recs if split in ("all", x["split"])]
            again = PopeMetrics.compute([x["pred"] for x in mine], [x["label"] for x in mine])
            assert m == pytest.approx(vars(again))
            tp, fp, fn = m["tp"], m["fp"], m["fn"]
            f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
            assert m["f1"] == pytest.approx(f1)
        assert res["speed"]["generated_tokens"] == sum(x["tokens"] for x in recs) and res["speed"]["tokens_per_s"] > 0
    torch_answers = [x["answer"] for x in doc["runs"][0]["result"]["records"]]
    f16_answers = [x["answer"] for x in doc["runs"][1]["result"]["records"]]
    # PyTorch (PEFT unmerged) and the merged F16 GGUF greedy-decode the same text on most items
    assert sum(a == b for a, b in zip(torch_answers, f16_answers)) >= len(f16_answers) // 2


def test_parallel_decoding_changes_no_answer(shapes, bundle, tmp_path):
    """POPE and MMHal through the batch engine (3 at once, kept image prompts) give the one-by-one records."""
    docs = {}
    for bench, args in (("pope", [str(shapes / "shapes_pope_random.jsonl"), str(shapes / "shapes_pope_adversarial.jsonl")]),
                        ("mmhal", [str(shapes / "mmhal.json"), "--judge", "world"])):
        for parallel in ("1", "3"):
            out = tmp_path / f"{bench}-{parallel}.json"
            assert run(["eval", bench, *args, "--model", str(bundle), "--quant", "Q8_0", "--max-tokens", "6",
                        "--threads", "1", "--parallel", parallel, "--json", str(out)]) == 0
            docs[bench, parallel] = json.loads(out.read_text())["runs"][0]["result"]
    for bench in ("pope", "mmhal"):
        one, many = docs[bench, "1"], docs[bench, "3"]
        assert one["records"] == many["records"] and len(one["records"]) in (16, 8)
        assert sum(r["tokens"] for r in many["records"]) > len(many["records"])  # not all empty
        assert many["speed"]["generated_tokens"] == one["speed"]["generated_tokens"]
    assert docs["pope", "1"]["metrics"] == docs["pope", "3"]["metrics"]


def test_mmhal_world_judge(shapes, bundle, tmp_path):
    from factedge.train.world.judge import judge
    from factedge.train.world.scene import Scene

    out = tmp_path / "mmhal.json"
    code = run(["eval", "mmhal", str(shapes / "mmhal.json"), "--model", str(bundle), "--judge", "world",
                "--max-tokens", "8", "--threads", "1", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["judge"] == "world" and doc["options"]["max_tokens"] == 8
    result = doc["runs"][0]["result"]
    scenes = json.loads((shapes / "scenes.json").read_text())
    items = json.loads((shapes / "mmhal.json").read_text())
    for rec in result["records"]:
        item = items[rec["index"]]
        verdict = judge(Scene.from_dict(scenes[item["image_id"]]), rec["answer"], question=item["question"])
        assert (rec["score"], rec["hallucinated"]) == (verdict.score, verdict.hallucinated)
    scores = [r["score"] for r in result["records"]]
    s = result["summary"]
    assert s["n"] == 8 and s["mean_score"] == pytest.approx(sum(scores) / 8)
    assert s["hallucination_rate"] == pytest.approx(sum(x < 3 for x in scores) / 8)
    assert len(s["per_type"]) == 8 and all(t["n"] == 1 for t in s["per_type"].values())


def test_prefix_reuse_changes_nothing(shapes, bundle):
    """Keeping the system prompt + image in the KV cache gives the answer a fresh chat gives."""
    from factedge.train.evaluate.backends import EdgeBackend, EdgeOptions

    image = shapes / "images" / "img0.png"
    questions = ["Is there a red circle in the image?", "What is in the image?", "How many shapes?"]
    with EdgeBackend(bundle, "Q8_0", options=EdgeOptions(threads=1)) as reused:
        kept = [reused.answer(image, q, 6) for q in questions]
    assert kept[1].prompt_tokens < kept[0].prompt_tokens  # the shared prefix was not evaluated again
    assert reused.speed()["items"] == 3
    for q, g in zip(questions[1:], kept[1:]):
        with EdgeBackend(bundle, "Q8_0", options=EdgeOptions(threads=1)) as fresh:
            assert fresh.answer(image, q, 6).tokens == g.tokens


def test_fidelity_on_a_folder(shapes, bundle, tiny_llava_rlhf, tmp_path):
    out = tmp_path / "fidelity.json"
    code = run(["eval", "fidelity", "--model", str(bundle), "--src", str(tiny_llava_rlhf.root), "--images",
                str(shapes / "images"), "--quant", "F16", "--limit", "2", "--n-greedy", "4", "--threads", "1",
                "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["images"] == ["img0.png", "img1.png"]
    assert [f["image"] for f in doc["embeddings"]["f16"]] == ["img0.png", "img1.png"]
    assert min(f["min_cosine"] for f in doc["embeddings"]["f16"]) > 0.999
    assert list(doc["logits"]) == ["F16"] and doc["summary"]["F16"]["greedy_total"] == 8
    per = doc["logits"]["F16"].values()
    top1 = sum(f["top1_agreement"] * f["positions"] for f in per) / sum(f["positions"] for f in per)
    assert doc["summary"]["F16"]["top1_agreement"] == pytest.approx(top1) and top1 > 0.9


def test_errors_are_one_line(shapes, bundle, tmp_path, capsys):
    assert run(["eval", "pope", str(shapes / "shapes_pope_random.jsonl")]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    (tmp_path / "remote.json").write_text(json.dumps([{"question": "q", "image_src": "https://example.invalid/x.jpg"}]))
    assert run(["eval", "mmhal", str(tmp_path / "remote.json"), "--model", str(bundle), "--images",
                str(shapes / "images")]) == 2  # a URL whose basename is nowhere local: refused before any work
    err = capsys.readouterr().err.strip()
    assert err.startswith("factedge: error:") and "\n" not in err and "does not download" in err


def test_quant_report(shapes, bundle, tiny_llava_rlhf, tmp_path):
    """Missing quants are made from F16 and registered; report JSON, markdown, plot, card and BENCHMARKS
    section agree with each other."""
    import shutil

    from factedge.edge.bundle import open_bundle
    from factedge.edge.manifest import read_manifest, sha256_file

    pytest.importorskip("matplotlib")
    copy = tmp_path / "tiny-rlhf"
    shutil.copytree(bundle, copy)
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text("# Benchmarks\n")
    code = run(["eval", "quant-report", "--model", str(copy), "--mmhal", str(shapes / "mmhal.json"),
                "--pope", str(shapes / "shapes_pope_random.jsonl"), "--quants", "F16,Q8_0,Q4_0", "--limit", "2",
                "--mmhal-max-tokens", "8", "--pope-max-tokens", "4", "--threads", "1", "--benchmarks", str(bench),
                "--torch", str(tiny_llava_rlhf.root)])
    assert code == 0
    made = read_manifest(copy).file("model", "Q4_0")
    assert made.sha256 == sha256_file(copy / made.name) and open_bundle(copy, quant="Q4_0").quant == "Q4_0"
    report = json.loads((copy / "eval" / "quant_report.json").read_text())
    rows = report["rows"]
    assert [r["quant"] for r in rows] == ["PyTorch", "F16", "Q8_0", "Q4_0"]
    assert rows[0]["size_bytes"] is None and rows[1]["size_bytes"] > rows[2]["size_bytes"] > rows[3]["size_bytes"]
    for row, m, p in zip(rows, report["mmhal"]["runs"], report["pope"]["runs"]):
        assert row["hallucination_rate"] == m["result"]["summary"]["hallucination_rate"]
        assert row["pope_f1"] == p["result"]["metrics"]["all"]["f1"]
        assert len(m["result"]["records"]) == 2 and len(p["result"]["records"]) == 2
    md = (copy / "eval" / "quant_report.md").read_text()
    q4 = rows[3]
    delta = (q4["hallucination_rate"] - rows[0]["hallucination_rate"]) * 100
    assert f"| tiny-rlhf:Q4_0 | {q4['size_bytes'] / 2**20:.1f} | {q4['hallucination_rate'] * 100:.1f}% | {delta:+.1f} |" in md
    assert "point of PyTorch's hallucination rate:" in md
    assert (copy / "eval" / "quant_report.png").read_bytes()[:4] == b"\x89PNG"
    card = (copy / "README.md").read_text()
    assert card.startswith("# factedge bundle") and "](eval/quant_report.png)" in card
    assert "<!-- factedge:quant-report:tiny-rlhf begin -->" in bench.read_text()


def test_bundle_path_never_imports_torch(shapes, bundle):
    """pope and mmhal (world judge) on a bundle run without torch: a base install can evaluate."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from factedge.edge.cli import run\n"
        f"assert run(['eval', 'pope', {str(shapes / 'shapes_pope_random.jsonl')!r}, '--model', {str(bundle)!r},"
        " '--limit', '1', '--max-tokens', '2', '--threads', '1']) == 0\n"
        f"assert run(['eval', 'mmhal', {str(shapes / 'mmhal.json')!r}, '--model', {str(bundle)!r}, '--limit', '1',"
        " '--max-tokens', '2', '--threads', '1']) == 0\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "TORCH False" in out.stdout
