"""Token-type policy: reasoning tokens are dynamic, context/tool tokens static unless they exceed
dynamic_threshold x the calibrated range; the threshold changes which path runs and the error."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lagoon.config import LagoonConfig
from lagoon.errors import QuantizationError
from lagoon.quant import QuantConfig, TokenType, get_scheme, token_types
from lagoon.quant.linear import QuantizedLinear
from lagoon.quant.policy import activation_absmax, current_token_types, reasoning_types

C, TO, R = TokenType.CONTEXT, TokenType.TOOL_OUTPUT, TokenType.REASONING



@pytest.fixture(autouse=True)
def _no_grad():
    # Inference-only tests; a module-level set_grad_enabled(False) would leak into other packages' tests.
    with torch.no_grad():
        yield


def rows_with_absmax(values: list[float], k: int = 32) -> torch.Tensor:
    x = torch.rand(len(values), k) * 0.5
    x[:, 0] = torch.tensor(values)
    return x


def test_absmax_per_token_type() -> None:
    x = rows_with_absmax([1.0, 3.0, 1.0, 1.0])
    static = torch.tensor([2.0, 2.0, float("nan")])
    absmax, dyn = activation_absmax(x, static, 0.75, torch.tensor([C, C, TO, R]))
    # row 1 exceeds 0.75 x 2.0; row 3 is reasoning; rows 0 and 2 take the static range
    assert dyn.tolist() == [False, True, False, True]
    assert absmax.squeeze(-1).tolist() == pytest.approx([2.0, 3.0, 2.0, 1.0])


def test_zero_threshold_no_tags_or_no_calibration_mean_dynamic() -> None:
    x = rows_with_absmax([1.0, 1.0])
    types = torch.tensor([C, TO])
    assert activation_absmax(x, torch.tensor([2.0, 2.0, 2.0]), 0.0, types)[1].all()
    assert activation_absmax(x, torch.tensor([2.0, 2.0, 2.0]), 0.75, None)[1].all()
    assert activation_absmax(x, torch.full((3,), math.nan), 0.75, types)[1].all()


def test_tags_apply_only_when_counts_match() -> None:
    with token_types([C, C, R]):
        assert current_token_types(3) is not None
        assert current_token_types(4) is None
    assert current_token_types(3) is None
    with pytest.raises(QuantizationError, match="token types"), token_types([5]):
        pass


def test_reasoning_types_are_built_once_and_others_still_checked() -> None:
    # a decode step's tags come from reasoning_types (built once per batch size, taken unchecked);
    # any other tensor, even one equal to them, is still checked
    assert reasoning_types(3) is reasoning_types(3) and reasoning_types(3).tolist() == [R, R, R]
    with token_types(reasoning_types(3)):
        assert current_token_types(3) is reasoning_types(3)
    with pytest.raises(QuantizationError, match="token types"), token_types(torch.tensor([R, R, 7])):
        pass


@pytest.mark.parametrize("scheme", ["w8a8", "fp8"])
def test_threshold_switches_path_and_error(scheme: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=False)
    x = torch.randn(32, 64)
    x[5] *= 8.0  # one context token far outside the calibrated range
    static = x[torch.arange(32) != 5].abs().amax()
    types = torch.full((32,), int(C))
    ref = lin(x)

    def run(threshold: float) -> tuple[int, float]:
        q = QuantizedLinear.from_float(lin, get_scheme(scheme), dynamic_threshold=threshold)
        q.act_absmax[:2] = static
        with token_types(types):
            y = q(x)
        err = ((y[5] - ref[5]).norm() / ref[5].norm()).item()
        return q.dynamic_tokens, err

    dyn_lo, err_lo = run(0.75)  # the outlier is rescaled dynamically
    dyn_hi, err_hi = run(100.0)  # every context token keeps the static range: the outlier clips
    assert dyn_lo >= 1 and dyn_hi == 0
    assert err_hi > 5 * err_lo
    dyn_all, _ = run(0.0)
    assert dyn_all == 32


def test_reasoning_tokens_always_dynamic() -> None:
    torch.manual_seed(0)
    q = QuantizedLinear.from_float(nn.Linear(64, 16), get_scheme("w8a8"), dynamic_threshold=100.0)
    q.act_absmax[:] = 10.0
    with token_types([R] * 20 + [C] * 12):
        q(torch.randn(32, 64))
    assert q.dynamic_tokens == 20


def test_config_section_selects_scheme_and_threshold() -> None:
    cfg = LagoonConfig()
    assert QuantConfig.from_section(cfg.model_deployment.quantization) is None  # FP16 default
    sec = cfg.model_deployment.quantization.model_copy(
        update={"profile": "INT4", "dynamic_threshold": 0.5, "expert_calibration": False}
    )
    qc = QuantConfig.from_section(sec, group_size=64)
    assert (qc.scheme, qc.group_size, qc.dynamic_threshold, qc.expert_calibration) == ("int4", 64, 0.5, False)
    for profile, scheme in {"BF16": "bf16", "INT8": "int8", "W8A8": "w8a8", "FP8": "fp8"}.items():
        assert QuantConfig.from_section(sec.model_copy(update={"profile": profile})).scheme == scheme


def test_the_package_imports_its_names_on_first_use():
    """The engine imports `lagoon.quant.policy` on every start; the package's other modules (the MoE
    experts among them) stay unimported until one of their names is used, and every name resolves."""
    import subprocess
    import sys

    code = ("import sys, lagoon.quant.policy; print(sorted(m for m in sys.modules if m.startswith(('lagoon.quant.', 'lagoon.moe')))); "
            "import lagoon.quant as q; print(all(getattr(q, n) is not None for n in q.__all__), set(q.__all__) <= set(dir(q)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300).stdout.split("\n")
    assert out[0] == "['lagoon.quant.policy']" and out[1] == "True True", out
