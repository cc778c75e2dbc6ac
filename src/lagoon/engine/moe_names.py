"""Map MoE checkpoint tensors (as `save_pretrained` writes them: one tensor per expert) onto
`lagoon.moe.SparseMoE`'s stacked parameters.

    block_sparse_moe.experts.E.w1/w3/w2 (Mixtral)  ┐
    mlp.experts.E.gate_proj/up_proj/down_proj       ├→ mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I]
    mlp.experts.gate_up_proj / down_proj (stacked)  ┘   (already stacked: kept)
    …gate.weight [E, H]                              → mlp.router.weight
    mlp.shared_expert(s).*, mlp.shared_expert_gate   → mlp.shared_expert.*, mlp.shared_expert_gate

A missing expert raises `CheckpointError` naming it. This module is *not* a general renamer.
"""

from __future__ import annotations

import re

import torch

from lagoon.errors import CheckpointError
from lagoon.model.args import ModelArgs

__all__ = ["hf_moe_state"]

_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight$")
_PROJ = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def hf_moe_state(args: ModelArgs, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, int, str], torch.Tensor] = {}
    for name, t in state.items():
        name = name.replace(".block_sparse_moe.", ".mlp.").replace(".shared_experts.", ".shared_expert.")
        m = _EXPERT.match(name)
        if m and m.group(3) in _PROJ:
            experts[(int(m.group(1)), int(m.group(2)), _PROJ[m.group(3)])] = t
            continue
        if re.match(r"^layers\.\d+\.mlp\.gate\.weight$", name):
            name = name.replace(".mlp.gate.", ".mlp.router.")
        out[name] = t
    for layer in range(args.n_layers):
        if not args.is_moe_layer(layer) or f"layers.{layer}.mlp.experts.down_proj" in out:
            continue
        gu, down = [], []
        for e in range(args.num_experts):
            try:
                g, u, d = (experts[(layer, e, p)] for p in ("gate", "up", "down"))
            except KeyError as exc:
                raise CheckpointError(
                    f"expert {e} of layer {layer} lacks its {exc.args[0][2]} projection; the checkpoint is incomplete"
                ) from None
            gu.append(torch.cat([g, u], dim=0))  # [2I, H]
            down.append(d)  # [H, I]
        out[f"layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(gu)  # [E, 2I, H]
        out[f"layers.{layer}.mlp.experts.down_proj"] = torch.stack(down)  # [E, H, I]
    return out
