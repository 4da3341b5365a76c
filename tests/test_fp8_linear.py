"""The float8 linear layers that `bench/gpu_speed.py --tune fp8_linear` times (webui/engine/fp8_linear.py)."""
import torch
from torch import nn

from webui.engine.fp8_linear import Fp8Linear, scaled_product, use_fp8_linears


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def test_an_fp8_linear_is_close_to_the_layer_it_replaces_in_each_dtype():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        layer = nn.Linear(64, 48).to(dtype)
        x = torch.randn(2, 7, 64).to(dtype) * 30  # scaled: the per-call input scale must follow it
        got, want = Fp8Linear(layer)(x), layer(x)
        assert got.dtype == dtype and got.shape == want.shape
        # e4m3 keeps 3 mantissa bits: a few percent off, but never exact (the matmul really ran in 8 bits).
        assert 1e-3 < relative_error(got, want) < 0.08, dtype


def test_an_all_zero_input_gives_the_bias_and_no_nan():
    layer = nn.Linear(32, 16)
    got = Fp8Linear(layer)(torch.zeros(3, 32))
    assert torch.isfinite(got).all()
    assert torch.allclose(got, layer.bias.detach().expand(3, 16), atol=1e-6)


def test_only_linears_the_fp8_matmul_takes_are_replaced():
    model = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Sequential(nn.Linear(64, 40)), nn.Linear(40, 16))
    assert use_fp8_linears(model) == 1  # 40 is no multiple of 16: the two layers that read or write it stay
    assert isinstance(model[0], Fp8Linear) and type(model[2][0]) is nn.Linear and type(model[3]) is nn.Linear
    x = torch.randn(4, 32)
    assert model(x).shape == (4, 16)


def test_after_calibrating_each_layer_scales_by_the_largest_input_it_saw_and_one_never_called_stays_dynamic():
    from webui.engine.fp8_linear import FP8_MAX, calibrated

    torch.manual_seed(1)
    model = nn.ModuleDict({"used": nn.Linear(32, 16), "unused": nn.Linear(32, 16)})
    use_fp8_linears(model)
    small, large = torch.randn(5, 32), torch.randn(5, 32) * 10
    with calibrated(model):
        model["used"](small)
        model["used"](large)
    assert torch.allclose(model["used"].input_scale, large.abs().max() / FP8_MAX)
    assert model["unused"].input_scale is None and model["used"].seen_amax is None
    # On the largest input the static scale is the dynamic one: the same numbers.
    dynamic = Fp8Linear(nn.Linear(32, 16))
    dynamic.load_state_dict(model["used"].state_dict())
    assert torch.equal(model["used"](large), dynamic(large))
    # On a smaller input it is coarser than the dynamic scale, but still close to the fp32 layer.
    assert relative_error(model["used"](small), dynamic(small)) < 0.2


def test_off_a_gpu_the_product_is_the_float8_matmuls_to_fp32_rounding():
    from webui.engine.fp8_linear import FP8, _scale, _to_fp8

    torch.manual_seed(2)
    rows, weight = torch.randn(40, 64) * 5, torch.randn(32, 64)
    rows_scale, weight_scale = _scale(rows), _scale(weight)
    operands = (_to_fp8(rows, rows_scale), rows_scale, _to_fp8(weight, weight_scale), weight_scale)
    assert operands[0].dtype == FP8
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        float8 = scaled_product(*operands, dtype, tensor_cores=True)  # torch._scaled_mm, as on a GPU
        fp32 = scaled_product(*operands, dtype)  # on this CPU: the fp32 product of the same operands
        assert fp32.dtype == float8.dtype == dtype
        assert relative_error(fp32, float8) < (1e-6 if dtype == torch.float32 else 4e-3), dtype
        assert relative_error(fp32, rows @ weight.t()) > 1e-3  # the 8-bit rounding is still there
