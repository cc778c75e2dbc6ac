"""The network: `ModelArgs` (from a HF config.json) and the plain `Transformer` (dense or MoE FFN)."""

from __future__ import annotations

from lagoon.model.args import FAMILIES, ModelArgs
from lagoon.model.transformer import Transformer

__all__ = ["ModelArgs", "Transformer", "FAMILIES"]
