"""The OpenAI-compatible judge against a fake local server (no network): request, parsing, retries,
and `factedge eval mmhal --judge URL` end to end on a tiny bundle."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from factedge.train.evaluate.judges import (JudgeError, OpenAIJudge, OpenAIJudgeOptions, chat_completions_url,
                                            parse_rating, rubric_prompt)
from factedge.train.evaluate.mmhal import MMHalItem


class FakeServer:
    """/v1/chat/completions: each POST is recorded; the reply is `reply(body)` -> (status, content)."""

    def __init__(self, reply):
        self.requests: list[tuple[dict, dict]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((dict(self.headers), body))
                status, content = reply(body) if self.path == "/v1/chat/completions" else (404, "")
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def serve():
    servers = []

    def start(reply):
        servers.append(FakeServer(reply))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


ITEM = MMHalItem(3, "How many cats are there?", None, ["Lynx", "Cat"], "There are two cats.", "counting")
FAST = dict(retries=2, backoff_s=0.0, timeout_s=10.0)


def test_parse_rating_and_url():
    assert parse_rating("The answer is wrong.\nRating: 1, somewhat informative, with hallucination") == 1
    assert parse_rating("rating:4") == 4
    assert parse_rating("Rating: 5 ... on reflection, Rating: 5") == 5  # one distinct value
    assert parse_rating("Rating: 2 or Rating: 3") is None  # MMHal's script: several -> unusable
    assert parse_rating("no verdict here") is None
    assert chat_completions_url("http://h:8/v1/") == "http://h:8/v1/chat/completions"
    assert chat_completions_url("http://h:8/v1/chat/completions") == "http://h:8/v1/chat/completions"


def test_request_and_scoring(serve, monkeypatch):
    server = serve(lambda body: (200, "The LMM claims one cat; there are two.\nRating: 1"))
    monkeypatch.setenv("FAKE_JUDGE_KEY", "sk-test")
    judge = OpenAIJudge(server.url, OpenAIJudgeOptions(model="judge-x", api_key_env="FAKE_JUDGE_KEY", **FAST))
    result = judge.score(ITEM, "There is one cat.")
    assert (result.score, result.hallucinated, result.parsed) == (1, True, True)
    assert "two" in result.explanation and judge.name == "openai:judge-x"
    headers, body = server.requests[0]
    assert headers["Authorization"] == "Bearer sk-test"
    assert (body["model"], body["temperature"]) == ("judge-x", 0.0)
    prompt = body["messages"][0]["content"]
    assert prompt == rubric_prompt(ITEM, "There is one cat.")
    for part in ("Lynx, Cat", "How many cats are there?", "There are two cats.", "There is one cat.",
                 "Rating: 6, very informative with good analysis or reasoning, no hallucination",
                 "Rating: 0, not informative, with hallucination"):
        assert part in prompt


def test_unparsed_retry_and_errors(serve):
    replies = iter([(503, ""), (200, "Rating: 3 or Rating: 4")])
    server = serve(lambda body: next(replies))
    result = OpenAIJudge(server.url, OpenAIJudgeOptions(**FAST)).score(ITEM, "Some cats.")
    assert len(server.requests) == 2  # retried after the 503
    assert (result.score, result.hallucinated, result.parsed) == (0, True, False)  # as MMHal: scored 0

    bad = serve(lambda body: (400, ""))
    with pytest.raises(JudgeError, match="HTTP 400"):
        OpenAIJudge(bad.url, OpenAIJudgeOptions(**FAST)).score(ITEM, "x")
    assert len(bad.requests) == 1  # a client error is not retried
    with pytest.raises(JudgeError, match="judge request failed"):
        OpenAIJudge("http://127.0.0.1:9/v1", OpenAIJudgeOptions(retries=0, timeout_s=2.0)).score(ITEM, "x")


def test_cli_mmhal_with_url_judge(serve, tmp_path, make_bundle, tiny_llava_rlhf):
    """`factedge eval mmhal --judge URL` on a tiny bundle: every answer reaches the judge, scores come back."""
    from factedge.edge.cli import run

    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (64 + 32 * i, 64), colour).save(tmp_path / f"im{i}.png")
    items = [{"question": f"What colour is the image? ({k})", "image_path": f"im{k % 2}.png",
              "image_content": ["colour"], "gt_answer": "red" if k % 2 == 0 else "blue"} for k in range(8)]
    (tmp_path / "mmhal.json").write_text(json.dumps(items))
    # rate by the answer's length: deterministic, and spread over the scale
    server = serve(lambda body: (200, f"ok\nRating: {len(body['messages'][0]['content'].split('### LMM answer')[1]) % 7}"))
    bundle = make_bundle(tiny_llava_rlhf, name="tiny-rlhf")
    out = tmp_path / "mmhal-results.json"
    code = run(["eval", "mmhal", str(tmp_path / "mmhal.json"), "--model", str(bundle), "--quant", "Q8_0",
                "--judge", server.url, "--judge-model", "fake", "--limit", "6", "--max-tokens", "6",
                "--threads", "1", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "mmhal" and doc["judge"] == "openai:fake" and len(doc["runs"]) == 1
    records = doc["runs"][0]["result"]["records"]
    assert [r["index"] for r in records] == list(range(6))
    assert [r["question_type"] for r in records] == ["attribute", "adversarial object", "comparison", "counting",
                                                     "spatial relation", "environment"]
    assert doc["judge_calls"] == len(server.requests) == len({(r["index"], r["answer"]) for r in records})
    answers = [body["messages"][0]["content"].split("### LMM answer\n")[1].rstrip("\n") for _, body in server.requests]
    assert [r["answer"] for r in records] == answers
    summary = doc["runs"][0]["result"]["summary"]
    scores = [r["score"] for r in records]
    assert summary["mean_score"] == pytest.approx(sum(scores) / 6)
    assert summary["hallucination_rate"] == pytest.approx(sum(s < 3 for s in scores) / 6)
    assert all(r["tokens"] <= 6 for r in records)
    assert doc["runs"][0]["backend"]["quant"] == "Q8_0"
