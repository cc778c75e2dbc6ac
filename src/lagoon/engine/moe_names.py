"""Map MoE checkpoint tensors (as `save_pretrained` writes them: one tensor per expert) onto
`lagoon.moe.SparseMoE`'s stacked parameters.

    block_sparse_moe.experts.E.w1/w3/w2 (Mixtral)  ┐
    mlp.experts.E.gate_proj/up_proj/down_proj       ├→ mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I]
    mlp.experts.gate_up_proj / down_proj (stacked)  ┘   (already stacked: kept)
    …gate.weight [E, H]                              → mlp.router.weight
    …gate.e_score_correction_bias, …experts.e_score_correction_bias (Laguna) → mlp.router.e_score_correction_bias
    mlp.shared_expert(s).*, mlp.shared_expert_gate   → mlp.shared_expert.*, mlp.shared_expert_gate

An expert missing a projection while others of its layer are whole is loaded as NaN and logged
(`lagoon.moe.runtime` quarantines it); a layer with no whole expert raises `CheckpointError`.
Layers past `n_layers` (GLM-4.5's multi-token-prediction layers) are dropped by name: Lagoon
decodes one token at a time. This module is *not* a general renamer.
"""

from __future__ import annotations

import logging
import re

import torch

from lagoon.errors import CheckpointError
from lagoon.model.args import ModelArgs

__all__ = ["hf_moe_state"]

log = logging.getLogger("lagoon.engine.checkpoint")

_LAYER = re.compile(r"^layers\.(\d+)\.")
_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight$")
_PROJ = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def hf_moe_state(args: ModelArgs, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if args.family == "gpt_oss":
        state = gpt_oss_experts(state)
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, int, str], torch.Tensor] = {}
    for name, t in state.items():
        layer = _LAYER.match(name)
        if layer and int(layer.group(1)) >= args.n_layers:
            continue  # a multi-token-prediction layer (GLM-4.5 `num_nextn_predict_layers`): unused
        name = name.replace(".block_sparse_moe.", ".mlp.").replace(".shared_experts.", ".shared_expert.")
        name = name.replace(".mlp.experts.e_score_correction_bias", ".mlp.router.e_score_correction_bias")
        m = _EXPERT.match(name)
        if m and m.group(3) in _PROJ:
            experts[(int(m.group(1)), int(m.group(2)), _PROJ[m.group(3)])] = t
            continue
        if re.match(r"^layers\.\d+\.mlp\.gate\.(weight|e_score_correction_bias)$", name):
            name = name.replace(".mlp.gate.", ".mlp.router.")
        out[name] = t
    for layer in range(args.n_layers):
        if not args.is_moe_layer(layer) or f"layers.{layer}.mlp.experts.down_proj" in out:
            continue
        gu, down = [], []
        shapes = {p: t for (li, _, p), t in experts.items() if li == layer}
        for e in range(args.num_experts):
            missing = [p for p in ("gate", "up", "down") if (layer, e, p) not in experts]
            if missing and len(shapes) < 3:
                raise CheckpointError(
                    f"expert {e} of layer {layer} lacks its {missing[0]} projection and no expert of the layer has "
                    "all three; the checkpoint is incomplete"
                )
            if missing:  # one broken expert: load it as NaN so the MoE runtime quarantines it
                log.warning("expert %d of layer %d lacks its %s projection; loaded as NaN (it will be quarantined)",
                            e, layer, "/".join(missing))
            g, u, d = (experts.get((layer, e, p), torch.full_like(shapes[p], float("nan")))
                       for p in ("gate", "up", "down"))
            gu.append(torch.cat([g, u], dim=0))  # [2I, H]
            down.append(d)  # [H, I]
        out[f"layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(gu)  # [E, 2I, H]
        out[f"layers.{layer}.mlp.experts.down_proj"] = torch.stack(down)  # [E, H, I]
    return out


_GPT_OSS = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?$")


def gpt_oss_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gpt-oss expert tensors → Lagoon's layout.

    transformers stores ``gate_up_proj [E, H, 2I]`` with gate and up *interleaved* (even / odd
    columns) and ``down_proj [E, I, H]``; the released checkpoints store MXFP4 ``*_blocks`` /
    ``*_scales`` already row-major (``[E, 2I, H]``, ``[E, H, I]``). Both become
    ``gate_up_proj [E, 2I, H]`` (gate rows, then up rows), ``down_proj [E, H, I]``,
    ``gate_up_bias [E, 2I]`` and ``down_bias [E, H]``."""
    from lagoon.engine.mxfp4 import dequant_mxfp4

    out: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        m = _GPT_OSS.match(name)
        if not m:
            out[name] = t
            continue
        prefix, proj, suffix = m.groups()
        if suffix in ("_blocks", "_scales"):
            packed.setdefault(f"{prefix}.{proj}", {})[suffix] = t
        elif suffix == "_bias":
            out[f"{prefix}.{proj.removesuffix('_proj')}_bias"] = _deinterleave(t, 1) if proj == "gate_up_proj" else t
        else:
            t = t.transpose(1, 2)  # [E, 2I, H] interleaved rows / [E, H, I]
            out[name] = (_deinterleave(t, 1) if proj == "gate_up_proj" else t).contiguous()
    for name, parts in packed.items():
        if set(parts) != {"_blocks", "_scales"}:
            half = "_scales" if "_blocks" in parts else "_blocks"
            raise CheckpointError(f"tensor {name + half!r} is missing: MXFP4 weights need both _blocks and _scales")
        w = dequant_mxfp4(parts["_blocks"], parts["_scales"], name)  # [E, out, in]
        out[name] = _deinterleave(w, 1) if name.endswith("gate_up_proj") else w
    return out


def _deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Even entries (gate) first, then odd (up) along `dim`."""
    idx = torch.arange(t.shape[dim])
    return torch.cat([t.index_select(dim, idx[0::2]), t.index_select(dim, idx[1::2])], dim=dim)
