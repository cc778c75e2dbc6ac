"""`moefy`: turn a dense checkpoint into a sparse MoE one by splitting each FFN into experts.

MoEfication (Zhang et al., 2022) and LLaMA-MoE (neuron-independent split): a gated FFN
``down · (act(gate · x) ⊙ up · x)`` is a sum over its I neurons, so partitioning the neurons into E
groups of I/E gives E experts whose outputs *sum* to the dense FFN exactly. Here:

* neurons are clustered by their gate vectors (rows of ``gate_proj``, L2-normalised) with
  scikit-learn's k-means, then assigned to clusters under an equal-size constraint (greedy over the
  neuron–centroid distances, nearest first), so every expert has I/E neurons;
* each expert's router row is its centroid in hidden space — the "expert prototype" a token's
  normalised hidden state is compared with (dot product). With calibration text (the default: the
  shipped ``lagoon/quant/data/calibration.txt``, never the held-out text fidelity is scored on)
  the centroid is the mean of the normalised FFN inputs weighted by how much that expert
  contributed to each token's output (‖expert output‖), minus the plain mean, so it points where
  that expert matters more than average; without text it is the mean normalised gate vector of the
  expert's neurons (data-free, measured ~2x worse top-1 agreement at k = 6 of 8);
* chosen experts are summed with weight 1 (``lagoon_expert_weighting: unit`` in config.json;
  `lagoon.moe.Router` ``weighting="unit"``), so k = E reproduces the dense model's logits.

The result is an ordinary HF folder (config.json of the matching MoE family: llama → mixtral,
qwen2 → qwen2_moe, qwen3 → qwen3_moe; model.safetensors; the tokenizer; ``experts.sha256.json``
for the degraded-expert checks; ``moefy.json`` recording source, E, k and seed) that
`lagoon.engine.load_model` loads. ``embedded-moe`` is the embedded SmolLM2 moefied with the preset
below, built on first use under ``~/.cache/lagoon/models`` (never shipped, nothing downloaded).

Not here: fidelity numbers (`lagoon.quant.fidelity.text_fidelity` measures them) or training a
router (the centroid router is not fine-tuned).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lagoon.cache_dir import cache_root
from lagoon.errors import ConfigError, UnsupportedModelError

__all__ = ["moefy", "split_ffn", "save_moefied", "embedded_moe_path", "EMBEDDED_MOE", "PRESET"]

log = logging.getLogger("lagoon.moe.moefy")

EMBEDDED_MOE = "embedded-moe"
PRESET = {"num_experts": 8, "top_k": 8, "seed": 0}
"""`embedded-moe`: the smallest k that kept top-1 agreement >= 90% with the dense model on the shipped
held-out text (985 tokens; calibrated router; measured 2026-11-29, table in docs/architecture.md):
E=8: k=4 13.9%, k=5 26.4%, k=6 44.5%, k=7 63.9%, k=8 100%; E=16: k=14 68.2%, k=15 78.4%. SmolLM2's SiLU FFNs are not
activation-sparse, so without retraining only k = E passes; the preset is therefore the exact (dense-
equivalent) split, and its router still ranks experts (offloading, stats and quarantine see real
weights on real text)."""

_MOE_FAMILY = {"llama": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}


def split_ffn(gate: torch.Tensor, num_experts: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """Partition the I neurons of an FFN (``gate [I, H]``) into `num_experts` equal groups.

    Returns ``groups [E, I/E]`` (neuron ids, ascending within a group) and ``centroids [E, H]``
    (mean normalised gate vector of each group, float32)."""
    from sklearn.cluster import KMeans

    i = gate.shape[0]
    if num_experts < 1 or i % num_experts:
        raise ConfigError(f"num_experts={num_experts} must divide the FFN's {i} neurons; pick a divisor of {i}")
    feats = torch.nn.functional.normalize(gate.float(), dim=1).numpy().astype(np.float64)  # [I, H]
    km = KMeans(n_clusters=num_experts, n_init=1, random_state=seed).fit(feats)
    dist = ((feats[:, None, :] - km.cluster_centers_[None]) ** 2).sum(-1)  # [I, E]
    size = i // num_experts
    owner = np.full(i, -1)
    fill = np.zeros(num_experts, dtype=np.int64)
    for flat in np.argsort(dist, axis=None, kind="stable"):  # nearest pairs first, equal sizes
        n, e = divmod(int(flat), num_experts)
        if owner[n] < 0 and fill[e] < size:
            owner[n], fill[e] = e, fill[e] + 1
    groups = np.stack([np.flatnonzero(owner == e) for e in range(num_experts)])  # [E, I/E]
    centroids = torch.from_numpy(np.stack([feats[g].mean(0) for g in groups])).float()  # [E, H]
    return groups, centroids


def data_centroids(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                   groups: np.ndarray) -> torch.Tensor:
    """Router rows ``[E, H]`` from FFN inputs ``x [N, H]``: contribution-weighted mean of the
    normalised inputs minus their plain mean (see the module docstring)."""
    # N = calibration tokens, E = experts, H = hidden
    a = F.silu(x @ gate.T) * (x @ up.T)  # [N, I]
    g = torch.from_numpy(groups)
    contrib = torch.stack([(a[:, gi] @ down[:, gi].T).norm(dim=-1) for gi in g], dim=1)  # [N, E]
    share = contrib / contrib.sum(0, keepdim=True).clamp_min(1e-12)  # [N, E], columns sum to 1
    xn = F.normalize(x, dim=-1)  # [N, H]
    return (share.T @ xn - xn.mean(0)).float()  # [E, H]


def ffn_inputs(model: torch.nn.Module, ids: torch.Tensor, window: int = 256) -> list[torch.Tensor]:
    """Each layer's FFN input ``[N, H]`` (after the post-attention norm) over `ids` [N]."""
    got: list[list[torch.Tensor]] = [[] for _ in model.layers]
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda _m, a, i=i: got[i].append(a[0].reshape(-1, a[0].shape[-1]).float()))
        for i, layer in enumerate(model.layers)]
    try:
        with torch.no_grad():
            for s in range(0, ids.numel(), window):
                model(ids[None, s : s + window])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(g) for g in got]


def moefy(model: torch.nn.Module, num_experts: int, top_k: int, seed: int = 0,
          calibration: torch.Tensor | None = None) -> torch.nn.Module:
    """A new `Transformer` whose every FFN is `num_experts` experts, `top_k` routed per token
    (router rows from `calibration` token ids [N] when given, else data-free)."""

    args = model.args
    if args.is_moe:
        raise UnsupportedModelError("the model is already MoE; moefy takes a dense checkpoint")
    if args.family not in _MOE_FAMILY:
        raise UnsupportedModelError(f"moefy supports the dense families {', '.join(_MOE_FAMILY)}, not {args.family!r}")
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
    from lagoon.engine.checkpoint import _assemble
    from lagoon.model.args import ModelArgs

    if any(s.window is not None or s.output_gate or s.sinks for s in args.layers):
        raise UnsupportedModelError("moefy supports plain full-attention decoders only")
    new_args = ModelArgs.from_hf_config(hf_config(args, num_experts, top_k))
    inputs = ffn_inputs(model, calibration.reshape(-1)) if calibration is not None else None
    state: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if ".mlp." not in name:
            state[name] = t.float()
    for li, layer in enumerate(model.layers):
        mlp = layer.mlp
        gate, up, down = (_dense_weight(getattr(mlp, p)) for p in ("gate_proj", "up_proj", "down_proj"))
        groups, centroids = split_ffn(gate, num_experts, seed)
        if inputs is not None:
            centroids = data_centroids(inputs[li], gate, up, down, groups)
        g = torch.from_numpy(groups)
        state[f"layers.{li}.mlp.router.weight"] = centroids  # [E, H]
        state[f"layers.{li}.mlp.experts.gate_up_proj"] = torch.cat([gate[g], up[g]], dim=1).contiguous()  # [E, 2I', H]
        state[f"layers.{li}.mlp.experts.down_proj"] = down[:, g].permute(1, 0, 2).contiguous()  # [E, H, I']
    return _assemble(new_args, state, "float32", source="moefy")


def _dense_weight(linear: torch.nn.Module) -> torch.Tensor:
    w = getattr(linear, "weight", None)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise UnsupportedModelError(f"{type(linear).__name__} holds no float weight; load the dense model in float32")
    return w.detach().float()


def hf_config(args: Any, num_experts: int, top_k: int) -> dict[str, Any]:
    """config.json of the moefied form of the dense `args` (read back by `ModelArgs.from_hf_config`)."""
    rope = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(args.rope_scaling).items()}
    rope["rope_theta"] = args.rope_theta
    size = args.intermediate_size // num_experts
    return {
        "model_type": _MOE_FAMILY[args.family], "architectures": [], "vocab_size": args.vocab_size,
        "hidden_size": args.dim, "hidden_act": args.hidden_act,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "intermediate_size": size, "moe_intermediate_size": size,
        "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "rope_parameters": rope,
        "max_position_embeddings": args.max_position_embeddings, "attention_bias": args.qkv_bias,
        "qkv_bias": args.qkv_bias, "tie_word_embeddings": args.tie_word_embeddings,
        "bos_token_id": args.bos_token_id, "eos_token_id": list(args.eos_token_ids),
        "num_local_experts": num_experts, "num_experts": num_experts,
        "num_experts_per_tok": top_k, "norm_topk_prob": False, "lagoon_expert_weighting": "unit",
    }


def save_moefied(model: torch.nn.Module, folder: str | Path, tokenizer: Any, meta: dict[str, Any]) -> Path:
    """Write a moefied model as a HF folder (built in a temporary folder, renamed when complete)."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from lagoon.moe.runtime import write_expert_checksums

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (model.args.tie_word_embeddings and k == "lm_head.weight") and k != "inv_freq"}
        state = {k: v for k, v in state.items() if not k.endswith("e_score_correction_bias")}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "lagoon": "moefy-v1"})
        (tmp / "config.json").write_text(json.dumps(meta.pop("config"), indent=2) + "\n")
        (tmp / "moefy.json").write_text(json.dumps({"version": 1, **meta}, indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp))
        write_expert_checksums(model, tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def build(source: str | Path, out: str | Path, num_experts: int, top_k: int, seed: int = 0,
          calibration: str | Path | None = "default") -> Path:
    """Moefy the dense checkpoint `source` (HF folder, .gguf or `embedded`) into the folder `out`
    (`calibration`: a text file, ``"default"`` for the shipped one, None for the data-free router)."""
    from lagoon.engine.checkpoint import load_checkpoint
    from lagoon.engine.engine import EMBEDDED, embedded_gguf_path
    from lagoon.engine.tokenizer import load_tokenizer

    path = embedded_gguf_path() if str(source) == EMBEDDED else Path(source)
    dense = load_checkpoint(path, "float32")
    tokenizer = load_tokenizer(path)
    ids = None
    if calibration is not None:
        from lagoon.quant.calibrate import CALIBRATION_TEXT

        text_path = CALIBRATION_TEXT if calibration == "default" else Path(calibration)
        try:
            text = text_path.read_text()
        except OSError as exc:
            raise ConfigError(f"calibration text {text_path} is unreadable ({exc}); pass a text file") from exc
        ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False)[:2048])
    sparse = moefy(dense, num_experts, top_k, seed, calibration=ids)
    meta = {"source": str(source), "num_experts": num_experts, "top_k": top_k, "seed": seed,
            "config": hf_config(dense.args, num_experts, top_k),
            "calibration": None if calibration is None else str(calibration),
            "method": "balanced k-means of gate vectors; centroid router; unit expert weights"}
    return save_moefied(sparse, out, tokenizer, meta)


def embedded_moe_path() -> Path:
    """The `embedded-moe` preset's folder, built from the embedded GGUF on first use and cached."""
    from lagoon.engine.engine import embedded_gguf_path

    gguf = embedded_gguf_path()
    p = PRESET
    tag = f"{gguf.stat().st_size}-e{p['num_experts']}-k{p['top_k']}-s{p['seed']}-v1"
    root = cache_root() / "models"
    folder = root / f"{EMBEDDED_MOE}-{tag}"
    if not (folder / "moefy.json").is_file():
        log.info("building %s (first use): moefying the embedded model into %s", EMBEDDED_MOE, folder)
        build("embedded", folder, p["num_experts"], p["top_k"], p["seed"])
    return folder


def fidelity_table(source: str | Path, folder: str | Path, ks: list[int], max_tokens: int = 1024) -> list[dict[str, Any]]:
    """KL / top-1 agreement / perplexity of the moefied `folder` at each k against the dense `source`,
    on the shipped held-out text (`lagoon.quant.fidelity.HELDOUT_TEXT`)."""
    from lagoon.engine.checkpoint import load_checkpoint
    from lagoon.engine.engine import resolve_model
    from lagoon.engine.tokenizer import load_tokenizer
    from lagoon.moe.layer import SparseMoE
    from lagoon.quant.fidelity import HELDOUT_TEXT, text_fidelity

    path = resolve_model(source)
    dense, sparse = load_checkpoint(path, "float32"), load_checkpoint(folder, "float32")
    ids = torch.tensor(load_tokenizer(path).encode(HELDOUT_TEXT.read_text(), add_special_tokens=False)[:max_tokens])
    rows = []
    for k in ks:
        for m in sparse.modules():
            if isinstance(m, SparseMoE):
                if not 1 <= k <= m.num_experts:
                    raise ConfigError(f"--report {k}: k must be between 1 and {m.num_experts}")
                m.router.top_k = k
        with torch.no_grad():
            f = text_fidelity(dense, sparse, ids)
        rows.append({"k": k, "tokens": f.tokens, "top1": f.top1_agreement, "kl": f.mean_kl, "ppl_dense": f.ppl_float,
                     "ppl_moe": f.ppl_quant, "ppl_delta_pct": f.ppl_delta_pct})
    return rows
