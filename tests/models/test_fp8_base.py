"""The FP8 frozen base (`load_in_fp8`): FP8Linear in place of each decoder linear, LoRA on top, the fused
kernel path and the per-projection path agreeing, and the loss within FP8's precision of the 16-bit model."""

from __future__ import annotations

import copy

import pytest
import torch
from model_cases import make_model

from fasttune.kernels.fp8 import (
    E4M3,
    FP8Weight,
    fp8_grad_reference,
    fp8_linear_reference,
    quantize_rows_reference,
)
from fasttune.lora.apply import apply_lora
from fasttune.lora.layer import LoRALinear
from fasttune.models.fp8 import FP8Linear, fp8_linears

TINY16 = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)


def _lora_model(fp8: bool, device="cpu", seed=0):
    model = make_model(seed=seed, **TINY16).to(device)
    if fp8:
        fp8_linears(model, device, require_fp8_cores=False)
    apply_lora(model, r=4, lora_alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.train()


def _loss_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, targets=ids)
    (out.loss_sum / out.n_tokens).backward()
    return out.loss_sum.detach() / out.n_tokens, {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.requires_grad}


def test_fp8_linears_replace_the_decoder_linears_only():
    model = make_model(**TINY16)
    names = fp8_linears(model, "cpu", require_fp8_cores=False)
    assert len(names) == 7 * model.config.num_hidden_layers and "lm_head" not in names
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, FP8Linear) and q.weight.dtype == E4M3 and not q.weight.requires_grad
    assert type(model.lm_head) is torch.nn.Linear
    with pytest.raises(RuntimeError, match="FP8 tensor cores"):
        fp8_linears(make_model(**TINY16), "cpu")  # the CPU has none: refused unless asked for tests


def test_lora_over_fp8_gives_the_kernels_an_fp8_weight():
    model = _lora_model(fp8=True)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and q.quantized
    dequant = q.kernel_weight()
    assert isinstance(dequant.fp8, FP8Weight)
    expect = (q.base_layer.weight.float() * q.base_layer.weight_scale).to(torch.bfloat16)
    torch.testing.assert_close(dequant(), expect, atol=0, rtol=0)


def test_fused_path_matches_per_projection_path_over_fp8():
    ids = torch.randint(0, 97, (2, 16))
    model = _lora_model(fp8=True)
    ref_loss, ref_grads = _loss_grads(model, ids)
    model.set_use_kernels(True)
    loss, grads = _loss_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, atol=2e-2, rtol=1e-2)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-3, rtol=5e-2, msg=name)
    model.set_gradient_checkpointing("offload")  # the rerun reads the same FP8 weights
    loss_ck, grads_ck = _loss_grads(model, ids)
    torch.testing.assert_close(loss_ck, loss, atol=0, rtol=0)
    for name in grads:  # the rerun sums the adapters' gradients in another order: fp32 rounding, relative to
        # each gradient's scale (on some CPUs' BLAS, up to 1e-4 of it)
        scale = float(grads[name].abs().max())
        torch.testing.assert_close(grads_ck[name], grads[name], atol=1e-3 * scale, rtol=1e-5, msg=name)


def test_fp8_loss_is_within_fp8_precision_of_the_16_bit_model():
    ids = torch.randint(0, 97, (2, 16))
    base_loss, _ = _loss_grads(_lora_model(fp8=False), ids)
    fp8_loss, _ = _loss_grads(_lora_model(fp8=True), ids)
    assert fp8_loss != base_loss  # the weights did change
    torch.testing.assert_close(fp8_loss, base_loss, atol=0, rtol=2e-2)


def test_fp8_linear_backward_runs_in_fp8():
    lin = torch.nn.Linear(32, 48, bias=True)
    q = FP8Linear.from_linear(copy.deepcopy(lin))
    x = torch.randn(5, 32, requires_grad=True)
    y = q(x)
    expect = fp8_linear_reference(*quantize_rows_reference(x.detach()), q.fp8(), torch.float32) + lin.bias
    torch.testing.assert_close(y, expect, atol=1e-5, rtol=1e-5)  # the CPU emulates the FP8 product
    dy = torch.randn_like(y)
    y.backward(dy)
    # dx = dy W from FP8 operands: dy with W's row scales folded in, quantised per row, times W8
    expect_dx = fp8_grad_reference(*quantize_rows_reference(dy, q.weight_scale), q.fp8(), torch.float32)
    torch.testing.assert_close(x.grad, expect_dx, atol=1e-6, rtol=1e-5)
    exact = dy @ (q.weight.float() * q.weight_scale)
    assert 1e-4 < ((x.grad - exact).norm() / exact.norm()).item() < 0.06


def test_lora_gradients_over_fp8_are_within_fp8_precision_of_the_dequantised_base():
    """Kernels on, forward and input-gradient products in FP8, against the same model whose base holds the
    dequantised weights (products in fp32): the loss and every LoRA gradient."""
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(5))
    fp8 = _lora_model(fp8=True)
    dense = _lora_model(fp8=False)
    with torch.no_grad():
        for name, m in fp8.named_modules():
            if isinstance(m, FP8Linear):
                dense.get_submodule(name).weight.copy_(m.weight.float() * m.weight_scale)
        dense_params = dict(dense.named_parameters())
        for name, p in fp8.named_parameters():
            if p.requires_grad:
                dense_params[name].copy_(p)
    for model in (fp8, dense):
        model.set_use_kernels(True)
    loss, grads = _loss_grads(fp8, ids)
    ref_loss, ref_grads = _loss_grads(dense, ids)
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=2e-2)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        rel = ((g - ref_grads[name]).norm() / ref_grads[name].norm()).item()
        assert rel < 0.1, (name, rel)


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda_only
def test_fp8_tensor_core_path_on_cuda():
    """On the GPU the fused path quantises x and runs torch._scaled_mm; the per-projection path does the
    same through FP8LinearFunction: same loss and adapter gradients up to bf16 rounding, and the loss
    within FP8's precision of the bf16 model."""
    from fasttune.kernels.fp8 import fp8_supported

    if not fp8_supported(torch.device("cuda")):
        pytest.skip("no FP8 tensor cores on this GPU")
    ids = torch.randint(0, 97, (2, 64), device="cuda")
    results = {}
    for name, fp8, kernels in (("bf16", False, True), ("fp8", True, False), ("fp8 fused", True, True)):
        model = _lora_model(fp8=fp8, device="cuda")
        model.set_use_kernels(kernels)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results[name] = _loss_grads(model, ids)
    (l16, _), (l8, g8), (l8f, g8f) = results["bf16"], results["fp8"], results["fp8 fused"]
    torch.testing.assert_close(l8f, l8, atol=0, rtol=1e-2)
    torch.testing.assert_close(l8, l16, atol=0, rtol=3e-2)
    for name in g8:
        torch.testing.assert_close(g8f[name], g8[name], atol=5e-3, rtol=0.1, msg=name)
