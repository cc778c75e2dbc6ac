"""llama.cpp as a fidelity reference: the logits of a GGUF file run by llama.cpp itself
(`llama_cpp`, the llama-cpp-python binding), so `lagoon quant fidelity --against-gguf FILE` scores a
llama.cpp quantization on the same text and the same token ids as Lagoon's own schemes.

    fn = llama_cpp_logits(path, n_ctx=window)   # ids [1, T] -> logits [1, T, V] (fp32)

Each call starts from an empty context (`reset`), evaluates the ids and reads the per-position
scores (the model is opened with ``logits_all=True``). The ids come from Lagoon's tokenizer of the
float source; a GGUF whose vocabulary size differs is refused (it is not the same model).
llama-cpp-python is optional and not a Lagoon dependency (it builds llama.cpp from source, ~7 min):
without it this raises QuantizationError naming the install. Not a runtime backend for serving.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import torch

from lagoon.errors import QuantizationError

__all__ = ["llama_cpp_logits", "INSTALL_HINT"]

INSTALL_HINT = (
    "llama_cpp is not importable: `pip install llama-cpp-python` (it compiles llama.cpp, several minutes; "
    "CMAKE_ARGS=-DLLAVA_BUILD=OFF helps) to score a GGUF file with llama.cpp, or drop --against-gguf"
)


def llama_cpp_logits(path: str | Path, n_ctx: int, vocab_size: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A logits function over `path` run by llama.cpp (see the module docstring)."""
    try:
        llama_cpp = importlib.import_module("llama_cpp")
    except ImportError as exc:
        raise QuantizationError(INSTALL_HINT) from exc
    p = Path(path)
    if not p.is_file():
        raise QuantizationError(f"--against-gguf {p}: no such file; give a .gguf file of the same model")
    try:
        llm = llama_cpp.Llama(model_path=str(p), n_ctx=n_ctx, logits_all=True, verbose=False)
    except (ValueError, RuntimeError, OSError) as exc:
        raise QuantizationError(f"llama.cpp cannot load {p}: {exc}; give a GGUF file llama.cpp reads") from exc
    n_vocab = int(llm.n_vocab())
    if vocab_size is not None and n_vocab != vocab_size:
        raise QuantizationError(
            f"{p} has a vocabulary of {n_vocab} tokens, the float model {vocab_size}: not the same model; "
            "give a GGUF quantized from the --model checkpoint"
        )

    def fn(ids: torch.Tensor) -> torch.Tensor:
        toks = [int(t) for t in ids.reshape(-1)]
        if len(toks) > n_ctx:
            raise QuantizationError(f"window of {len(toks)} tokens exceeds llama.cpp's n_ctx {n_ctx}")
        llm.reset()
        llm.eval(toks)
        scores = torch.as_tensor(llm.scores[: len(toks)], dtype=torch.float32)  # [T, V]
        return scores.unsqueeze(0)

    return fn
