"""A minimal OpenAI-compatible chat-completions server over a local transformers model.

It answers what the ``openai`` judge asks for: one generated token with its top-k log-probabilities. Useful to
serve a local judge model to several workflow jobs, and the real HTTP peer of the judge's tests.

    traitmon serve-judge --model-dir results/models/my-judge --port 8000
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

import torch

from traitmon.chat import encode_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class JudgeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str = "local",
                 fail_first: int = 0,
                 error_after: int | None = None, stall_after: int | None = None):
        super().__init__(address, _Handler)
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.lock = threading.Lock()  # one forward pass at a time
        # fault injection for tests: 429 to the first N requests (back-off), HTTP 400 after N answers
        # (a failing batch), no answer at all after N answers (a client killed mid-run)
        self.fail_first, self.error_after, self.stall_after = fail_first, error_after, stall_after
        self.release = threading.Event()  # lets stalled requests go (unanswered) at shutdown
        self.requests, self.stalled = 0, 0
        self.answered: list[str] = []  # the user message of every completed judgement, in order

    def shutdown(self) -> None:
        self.release.set()
        super().shutdown()

    def complete(self, payload: dict) -> dict:
        ids = torch.tensor([encode_prompt(self.tokenizer, payload["messages"])])
        k = int(payload.get("top_logprobs", 20))
        with self.lock, torch.no_grad():
            logits = self.model(input_ids=ids.to(next(self.model.parameters()).device)).logits[0, -1].float()
        logp = torch.log_softmax(logits, -1)
        top = torch.topk(logp, k)
        tokens = [self.tokenizer.decode([int(i)]) for i in top.indices]
        entries = [{"token": t, "logprob": float(v)} for t, v in zip(tokens, top.values)]
        with self.lock:
            self.answered.append(payload["messages"][-1]["content"])
        return {"id": f"cmpl-{self.requests}", "object": "chat.completion", "model": payload.get("model", self.name),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": tokens[0]},
                             "logprobs": {"content": [{**entries[0], "top_logprobs": entries}]},
                             "finish_reason": "length"}]}


class JsonHandler(BaseHTTPRequestHandler):
    """Quiet request handler that answers JSON (shared by traitmon's judge and generation servers)."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Handler(JsonHandler):
    server: JudgeServer

    def do_POST(self) -> None:
        self.server.requests += 1
        if not self.path.rstrip("/").endswith("/chat/completions"):
            return self._reply(404, {"error": {"message": f"no route {self.path}"}})
        if self.server.requests <= self.server.fail_first:
            return self._reply(429, {"error": {"message": "rate limited"}})
        done = len(self.server.answered)
        if self.server.error_after is not None and done >= self.server.error_after:
            return self._reply(400, {"error": {"message": "bad request"}})
        if self.server.stall_after is not None and done >= self.server.stall_after:
            self.server.stalled += 1
            self.server.release.wait()  # never answered: the client is expected to die meanwhile
            return None
        try:
            payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            return self._reply(200, self.server.complete(payload))
        except (KeyError, ValueError) as exc:
            return self._reply(400, {"error": {"message": str(exc)}})


def start_server(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, host: str = "127.0.0.1", port: int = 0,
                 **kwargs) -> JudgeServer:
    """Start in a background thread; ``server.server_address`` has the bound port. Stop with ``shutdown()``."""
    server = JudgeServer((host, port), model, tokenizer, **kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
