"""Judges that rate an MMHal answer 0-6 on MMHal-Bench's rubric (hallucination = rating < 3).

Two kinds, one protocol (`score(item, answer) -> JudgeResult`):
- `WorldJudge`: the synthetic shapes world's programmatic judge (factedge.train.world.judge), exact
  and free, for benchmarks written by `factedge data shapes-mmhal` (the item knows its scene);
- `OpenAIJudge`: any OpenAI-compatible chat-completions endpoint (GPT-4 as in the paper, or a local
  server), prompted with the rubric below and parsed as MMHal's script does: the reply must contain
  "rating: N" for exactly one N in 0..6; none or several -> 0 (the script's rule), flagged unparsed.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Protocol

from factedge.edge.errors import ConfigError, FactedgeError, InputError
from factedge.train.evaluate.mmhal_items import HALLUCINATION_BELOW, MMHalItem


@dataclass
class JudgeResult:
    score: int  # 0..6
    hallucinated: bool
    explanation: str
    parsed: bool = True  # False: the judge's reply had no single rating (scored 0, as MMHal does)


class Judge(Protocol):
    name: str

    def score(self, item: MMHalItem, answer: str) -> JudgeResult: ...


class JudgeError(FactedgeError):
    """The judge endpoint failed (network, HTTP status, malformed reply)."""

    exit_code = 7


# ---- the synthetic world's judge ------------------------------------------------------------------

class WorldJudge:
    """Rates against the item's scene with factedge.train.world.judge (deterministic, no model)."""

    name = "world"

    def __init__(self):
        try:
            from factedge.train.world import judge as world_judge
            from factedge.train.world.scene import Scene
        except ImportError as exc:
            raise ConfigError(f"the shapes-world judge is not available ({exc})") from exc
        self._judge, self._scene = world_judge.judge, Scene
        self._takes_question = "question" in inspect.signature(world_judge.judge).parameters

    def score(self, item: MMHalItem, answer: str) -> JudgeResult:
        if item.scene is None:
            raise InputError(f"item {item.index}: no scene for the world judge (a shapes-mmhal item carries one "
                             "in image_content or scenes.json); use --judge URL for real MMHal-Bench", item.source)
        scene = self._scene.from_dict(item.scene)
        kwargs = {"question": item.question} if self._takes_question else {}
        v = self._judge(scene, answer, **kwargs)
        score = int(v.score)
        if not 0 <= score <= 6:
            raise JudgeError(f"world judge returned score {score} outside 0..6")
        parts = []
        if v.hallucinations:
            parts.append("hallucinated: " + "; ".join(map(str, v.hallucinations)))
        if v.claims:
            parts.append("claims: " + "; ".join(map(str, v.claims)))
        return JudgeResult(score, bool(v.hallucinated), " | ".join(parts) or "no claims found")


# ---- an OpenAI-compatible endpoint with MMHal's rubric ------------------------------------------

RUBRIC = """You are grading the answer a large multimodal model (LMM) gave to a question about an image. \
You cannot see the image; you get a list of what it contains, the question, a correct answer written by a \
person, and the LMM's answer. Grade two things: how informative the LMM's answer is, and whether it \
hallucinates. A hallucination is any statement about the image that the image does not support: an \
object that is not there, a wrong count, colour, attribute, position, action or emotion, or a detail \
invented beyond what the contents and the human answer establish.

Be fair to the LMM:
- The human answer and the contents list are correct but may be incomplete; a plausible detail they do \
not mention is not automatically a hallucination, so judge with some care.
- Not answering, saying it is unsure, or missing objects the human answer mentions is not a hallucination \
(it only makes the answer less informative).
- General knowledge, analysis or reasoning that follows from what is in the image is welcome and counts \
as informative, as long as it asserts nothing false about the image.

First write a short explanation. Then give exactly one rating, in the form "Rating: N", from this scale:
- Rating: 6, very informative with good analysis or reasoning, no hallucination
- Rating: 5, very informative, no hallucination
- Rating: 4, somewhat informative, no hallucination
- Rating: 3, not informative, no hallucination
- Rating: 2, very informative, with hallucination
- Rating: 1, somewhat informative, with hallucination
- Rating: 0, not informative, with hallucination

### Image contents
{contents}

### Question
{question}

### Human answer
{gt_answer}

### LMM answer
{answer}
"""

_RATING = re.compile(r"rating:\s*([0-6])\b")


def rubric_prompt(item: MMHalItem, answer: str) -> str:
    contents = item.image_content
    text = ", ".join(map(str, contents)) if isinstance(contents, (list, tuple)) else str(contents or "")
    return RUBRIC.format(contents=text or "(not given)", question=item.question, gt_answer=item.gt_answer or "(not given)",
                         answer=answer)


def parse_rating(reply: str) -> int | None:
    """The one rating in the reply ("rating: N", case-insensitive); None when none or several differ."""
    found = set(int(m) for m in _RATING.findall(reply.lower()))
    return found.pop() if len(found) == 1 else None


def chat_completions_url(url: str) -> str:
    """Accept a base ("http://host:8000/v1") or the full ".../chat/completions" address."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


@dataclass
class OpenAIJudgeOptions:
    model: str = "gpt-4-0314"  # what MMHal-Bench's script used by default
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_tokens: int = 512
    timeout_s: float = 120.0
    retries: int = 3
    backoff_s: float = 5.0


class OpenAIJudge:
    """MMHal's GPT-4 judge over any OpenAI-compatible /chat/completions endpoint (stdlib HTTP only)."""

    name = "openai"

    def __init__(self, url: str, options: OpenAIJudgeOptions | None = None):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"judge must be 'world' or an http(s) URL, not {url!r}")
        self.url = chat_completions_url(url)
        self.options = options or OpenAIJudgeOptions()
        self.name = f"openai:{self.options.model}"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.options.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post(self, payload: dict) -> dict:
        data = json.dumps(payload).encode()
        last = ""
        for attempt in range(self.options.retries + 1):
            if attempt:
                time.sleep(self.options.backoff_s * attempt)
            request = urllib.request.Request(self.url, data=data, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.options.timeout_s) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code} {exc.reason}"
                if exc.code not in (408, 409, 429) and exc.code < 500:  # the request itself is wrong
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = str(getattr(exc, "reason", exc))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise JudgeError(f"judge reply is not JSON ({exc})", self.url) from exc
        raise JudgeError(f"judge request failed: {last}", self.url)

    def score(self, item: MMHalItem, answer: str) -> JudgeResult:
        o = self.options
        reply = self._post({"model": o.model, "temperature": o.temperature, "max_tokens": o.max_tokens,
                            "messages": [{"role": "user", "content": rubric_prompt(item, answer)}]})
        try:
            text = reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as exc:
            raise JudgeError(f"judge reply has no choices[0].message.content ({exc!r})", self.url) from exc
        rating = parse_rating(text)
        score = 0 if rating is None else rating
        return JudgeResult(score, score < HALLUCINATION_BELOW, text.strip(), parsed=rating is not None)


def make_judge(spec: str, options: OpenAIJudgeOptions | None = None) -> Judge:
    """'world' -> WorldJudge; an http(s) URL -> OpenAIJudge."""
    if spec == "world":
        return WorldJudge()
    return OpenAIJudge(spec, options)


class CachedJudge:
    """Rates each distinct (item, answer) once: quants often give the same answer, and an API judge
    costs money and time per call."""

    def __init__(self, judge: Judge):
        self.judge, self.name = judge, judge.name
        self._memo: dict[tuple[int, str, str], JudgeResult] = {}
        self.calls = 0

    def score(self, item: MMHalItem, answer: str) -> JudgeResult:
        key = (item.index, item.question, answer)
        if key not in self._memo:
            self.calls += 1
            self._memo[key] = self.judge.score(item, answer)
        return self._memo[key]
