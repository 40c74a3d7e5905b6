"""Comparison helpers shared by the kernel tests (kernel vs eager vs a high-precision reference)."""

from __future__ import annotations

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_bf16_close(kernel: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, what: str,
                      factor: float = 2.0) -> None:
    """The kernel's error against a high-precision result is at most `factor` x the eager bf16 error.

    A floor of 1/1024 of the result's largest magnitude (an eighth of a bf16 ulp there) keeps a result
    that eager happens to round exactly (error 0) from demanding bit-identity of a kernel that sums in
    another order.
    """
    assert kernel.shape == exact.shape, f"{what}: shape {tuple(kernel.shape)} != {tuple(exact.shape)}"
    k_err, e_err = max_err(kernel, exact), max_err(eager, exact)
    floor = 2.0 ** -10 * exact.double().abs().max().item()
    assert k_err <= factor * e_err + floor, (
        f"{what}: kernel error {k_err:.3g} > {factor} x eager error {e_err:.3g}")


def assert_fp32_close(kernel: torch.Tensor, exact: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    """fp32 kernel result within `rtol` (relative to the largest magnitude) of the high-precision result."""
    assert kernel.shape == exact.shape, f"{what}: shape {tuple(kernel.shape)} != {tuple(exact.shape)}"
    scale = max(exact.double().abs().max().item(), 1e-30) if exact.numel() else 1.0
    err = max_err(kernel, exact)
    assert err <= rtol * scale, f"{what}: error {err:.3g} > {rtol} x max |ref| {scale:.3g}"
