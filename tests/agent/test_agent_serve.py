"""The sample task solved end to end over a live `lagoon serve` through the router.

The served model is scripted: `ScriptedLM` is a torch module with the engine's model interface whose
logits put all the mass on the next token of the script's reply for the current request (one reply
per request, as `ScriptedChatModel` does). Everything else is real — the engine's scheduler and KV
cache, the HTTP server, the chat template with tools, `<tool_call>` parsing, the router's OpenAI
backend over loopback, and the agent's tools on a copy of examples/sample-repo.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

HERE = Path(__file__).parent
SAMPLE = HERE.parents[1] / "examples" / "sample-repo"


class ScriptedLM(torch.nn.Module):
    """Replies, request by request, with `<tool_call>` blocks for `script` (then end of turn)."""

    def __init__(self, args, tokenizer, script: list[dict]) -> None:
        super().__init__()
        self.args, self.tokenizer = args, tokenizer
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the engine reads the dtype off a parameter
        self.replies = [self._reply(entry) for entry in script]
        self.served = 0
        self.target: list[int] = []
        self.last_prompt_pos = 0

    def _reply(self, entry: dict) -> list[int]:
        name, args = ("bash", {"command": entry["bash"]}) if "bash" in entry else entry["tool"]
        text = "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"
        return [*self.tokenizer.encode(text, add_special_tokens=False), self.args.eos_token_ids[0]]

    def forward(self, tokens, pos, cache, last_only: bool = False):  # tokens, pos: [B, T]
        vocab = self.args.vocab_size
        if last_only:  # a prefill: a new request takes the next reply
            self.target = self.replies[min(self.served, len(self.replies) - 1)]
            self.served += 1
            self.last_prompt_pos = int(pos[0, -1])
        logits = torch.full((tokens.shape[0], 1, vocab), -1e4)  # [B, 1, V]
        for b in range(tokens.shape[0]):
            i = int(pos[b, -1]) - self.last_prompt_pos  # tokens already generated
            logits[b, 0, self.target[min(i, len(self.target) - 1)]] = 1e4
        return logits


@pytest.mark.network
@pytest.mark.slow  # ~10 s (transformers' tokenizer import, 5 requests of ~30k byte tokens); make test-slow
def test_scripted_model_behind_lagoon_serve_solves_the_sample_task_through_the_router(tmp_path, monkeypatch):
    from lagoon.agent import run_task
    from lagoon.config import EngineSection, load_config
    from lagoon.engine.engine import Engine
    from lagoon.engine.server.app import start_test_server
    from lagoon.engine.tiny import byte_tokenizer
    from lagoon.model.args import ModelArgs

    repo = tmp_path / "repo"
    shutil.copytree(SAMPLE, repo, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache", ".lagoon"))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    # byte-level tokens: the agent's prompts are tens of thousands of them
    engine_cfg = EngineSection(max_seq_len=65536, max_batch_size=1, prefix_cache=False)
    # the tiny models' shape and byte tokenizer (ChatML with tools); the KV cache is allocated, not read
    args = ModelArgs(family="llama", vocab_size=320, dim=64, n_layers=1, n_heads=4, n_kv_heads=1, head_dim=16,
                     intermediate_size=128, max_position_embeddings=65536, bos_token_id=257, eos_token_ids=(258,))
    tokenizer = byte_tokenizer()
    script = json.loads((HERE / "sample_solution.json").read_text())
    lm = ScriptedLM(args, tokenizer, script)
    engine = Engine(lm, tokenizer, name="scripted-coder", config=engine_cfg)
    url, stop = start_test_server(engine)
    try:
        cfg = load_config({
            "context": {"rerank": False},
            "routing": {"retrieval_bound": {"endpoint": f"{url}/chat/completions", "model": "scripted-coder",
                                            "api_key_env": None, "max_tokens": 400},
                        "reasoning_bound": {"endpoint": f"{url}/chat/completions", "model": "scripted-coder",
                                            "api_key_env": None, "max_tokens": 400},
                        "backoff_base_s": 0.01},
        })
        result = run_task("fix the failing test", repo, cfg)
    finally:
        stop()
    assert result.submitted, (result.exit_status, result.exit_message)
    assert result.steps == len(script) == lm.served
    assert result.model_used == "scripted-coder" and sum(result.backends.values()) == len(script)
    assert [c["exit_code"] for c in result.commands] == [0, 0]
    check = subprocess.run([sys.executable, "-m", "pytest", "-q"], cwd=repo, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
