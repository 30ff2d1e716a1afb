"""llama.cpp's own server as a benchmark reference (bench/speed/batch_speed.py): started on the same
model and mmproj files, asked through its OpenAI chat endpoint by N client threads at once.

Benchmark-only: factedge never depends on llama-server (bench/speed/build_llama_server.sh builds it
from the same patched tree). The prompt is factedge's own text with the image as base64 data, greedy,
`max_tokens` new tokens.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


MEDIA_MARKER = "<__media__>"  # libmtmd's default image marker, pinned for the server with LLAMA_MEDIA_MARKER


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    def __init__(self, binary: Path, model: Path, mmproj: Path | None, *, parallel: int, n_ctx: int, threads: int,
                 startup_s: float = 300.0):
        self.port = _free_port()
        args = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port), "-np", str(parallel),
                "-c", str(n_ctx), "-t", str(threads), "-tb", str(threads), "-ngl", "0", "--no-webui"]
        if mmproj is not None:
            args += ["--mmproj", str(mmproj)]
        self.log = Path(f"/tmp/llama-server-{self.port}.log")
        env = {**os.environ, "LLAMA_MEDIA_MARKER": MEDIA_MARKER}  # the server draws a random marker otherwise
        self._proc = subprocess.Popen(args, stdout=self.log.open("wb"), stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + startup_s
        while time.time() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self._proc.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.close()
        raise RuntimeError(f"llama-server did not become healthy in {startup_s:.0f} s; see {self.log}")

    def ask(self, question: str, image: Path | None, max_tokens: int) -> str:
        """/completion with factedge's prompt text (edge/prompt.py; llama.cpp's media marker where the
        image goes), so both servers see the same token ids: the chat endpoint would format it with its
        own handling of image parts."""
        from factedge.edge.prompt import IMAGE, single_turn

        text = single_turn(question, n_images=0 if image is None else 1).replace(IMAGE, MEDIA_MARKER)
        prompt: dict = {"prompt_string": text}
        if image is not None:
            prompt["multimodal_data"] = [base64.b64encode(Path(image).read_bytes()).decode()]
        body = json.dumps({"prompt": prompt, "temperature": 0, "n_predict": max_tokens, "cache_prompt": True,
                           "samplers": ["top_k"], "top_k": 1}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())["content"].strip()

    def answer_all(self, items: list[tuple[str, Path]], max_tokens: int, clients: int) -> list[str]:
        with ThreadPoolExecutor(clients) as pool:
            return list(pool.map(lambda it: self.ask(it[0], it[1], max_tokens), items))

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
