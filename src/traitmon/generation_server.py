"""A minimal OpenAI-compatible generation server over a local transformers model with peft LoRA adapters.

It implements the part of vLLM's server (``--enable-lora`` with runtime adapter loading) that answer sampling
uses: ``POST /v1/chat/completions`` with an adapter's name (or the base model's) as ``model``, and
``POST /v1/load_lora_adapter`` ``{lora_name, lora_path}`` / ``POST /v1/unload_lora_adapter`` ``{lora_name}``.
The base model is loaded once; adapters are swapped with peft's ``load_adapter`` / ``set_adapter``.

    traitmon serve-generate --model-dir results/models/smollm2 --port 8001
"""

from __future__ import annotations

import json
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

from traitmon.errors import TraitmonError
from traitmon.generate import generate_responses
from traitmon.judge_server import JsonHandler


class GenerationServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, model, tokenizer, name: str = "base"):
        super().__init__(address, _Handler)
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.lock = threading.Lock()  # one generate (and one adapter swap) at a time
        self.adapters: dict[str, str] = {}
        self.requests = 0

    def load_adapter(self, payload: dict) -> dict:
        from peft import PeftModel

        from traitmon.models import check_adapter_shapes

        name, path = str(payload["lora_name"]), str(payload["lora_path"])
        if name == self.name or name in self.adapters:
            raise ValueError(f"adapter name {name!r} is already in use")
        if not (Path(path) / "adapter_model.safetensors").is_file():  # only safetensors weights are read
            raise TraitmonError(f"{path}: not a peft adapter folder with adapter_model.safetensors")
        with self.lock:
            if isinstance(self.model, PeftModel):
                check_adapter_shapes(self.model.get_base_model(), path)
                self.model.load_adapter(path, adapter_name=name)
            else:  # the first adapter wraps the base model
                check_adapter_shapes(self.model, path)
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            self.model.eval()
            self.adapters[name] = path
        return {"status": "ok", "lora_name": name}

    def unload_adapter(self, payload: dict) -> dict:
        name = str(payload["lora_name"])
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r}")
        with self.lock:
            if len(self.adapters) == 1:  # peft refuses to delete the last adapter: unwrap instead
                self.model = self.model.unload()
            else:
                self.model.delete_adapter(name)
            del self.adapters[name]
        return {"status": "ok", "lora_name": name}

    def complete(self, payload: dict) -> dict:
        model_name = payload.get("model", self.name)
        if model_name != self.name and model_name not in self.adapters:
            raise KeyError(f"model {model_name!r} is not served (load it with /v1/load_lora_adapter)")
        max_tokens = int(payload.get("max_tokens", payload.get("max_completion_tokens", 16)))
        with self.lock:
            if model_name == self.name:
                answer = self._generate(payload, max_tokens, adapter=None)
            else:
                self.model.set_adapter(model_name)
                answer = self._generate(payload, max_tokens, adapter=model_name)
        self.requests += 1
        return {"id": f"cmpl-{self.requests}", "object": "chat.completion", "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                             "finish_reason": "stop"}]}

    def _generate(self, payload: dict, max_tokens: int, adapter: str | None) -> str:
        from contextlib import nullcontext

        base_only = adapter is None and hasattr(self.model, "disable_adapter")
        with self.model.disable_adapter() if base_only else nullcontext():
            return generate_responses(self.model, self.tokenizer, [payload["messages"]], max_tokens,
                                      float(payload.get("temperature", 1.0)), batch_size=1,
                                      seed=int(payload.get("seed", 0)), desc="serve")[0]


class _Handler(JsonHandler):
    server: GenerationServer

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            names = [self.server.name, *self.server.adapters]
            return self._reply(200, {"object": "list", "data": [{"id": n, "object": "model"} for n in names]})
        return self._reply(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        routes = {"/chat/completions": self.server.complete, "/load_lora_adapter": self.server.load_adapter,
                  "/unload_lora_adapter": self.server.unload_adapter}
        route = next((fn for suffix, fn in routes.items() if self.path.rstrip("/").endswith(suffix)), None)
        if route is None:
            return self._reply(404, {"error": {"message": f"no route {self.path}"}})
        try:
            payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            return self._reply(200, route(payload))
        except KeyError as exc:
            return self._reply(404, {"error": {"message": str(exc)}})
        except (ValueError, TypeError, TraitmonError) as exc:
            return self._reply(400, {"error": {"message": str(exc)}})


def start_server(model, tokenizer, host: str = "127.0.0.1", port: int = 0, **kwargs) -> GenerationServer:
    """Start in a background thread; ``server.server_address`` has the bound port. Stop with ``shutdown()``."""
    server = GenerationServer((host, port), model, tokenizer, **kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server

