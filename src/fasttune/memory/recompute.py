"""Recomputed layers: `run_layers` executes a `MemoryPlan` over the decoder stack, and `LayerRecompute` reruns
a layer in two halves for its backward.

A layer in halves keeps its input x and its midpoint x_mid = x + attn(x) (through the offloader, so in pinned
host memory unless the plan keeps them on the device), and the backward of each half reruns only what that
backward reads: RMSNorm, q/k/v and attention for the first half, RMSNorm, gate and up for the second. The o
and down projections' base products (a quarter of a layer's matmul FLOPs) are not rerun (the rerun of
`memory.layer_pass.LayerPass`), which an autograd-level checkpoint cannot know to skip. What else the plan
lets it keep (`memory.plan`) spares more of the rerun:
- kept attention: the attention output O and the softmax's log-sum-exp (`memory.kept_attention`), so the
  rerun of the first half skips the attention forward, quadratic in the row length; with kept q, k, v (q and
  k after RoPE) also the q/k/v base products and RoPE, leaving RMSNorm and the rank-r products;
- gate/up on the host (a share of the layers, spread evenly, as far as the host link and memory allow) or
  on the device (the last layers): the MLP's gate and up outputs g, u, so the rerun skips their products,
  the bulk of the recompute. With no kept layers the last layer's are free: its backward comes first, right
  after the loss, and would make them again anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fasttune.memory.layer_pass import LayerKept, LayerPass
from fasttune.memory.offload import LayerInputOffloader
from fasttune.memory.plan import MemoryPlan, whole_layer_input


class Halves(Protocol):
    """A pre-norm residual layer, its two branches exposed: x_mid = x + attn(x), out = x_mid + mlp(x_mid)."""

    def attn_branch(self, x: torch.Tensor, *args, layer_pass: LayerPass | None = None) -> torch.Tensor: ...
    def mlp_branch(self, x: torch.Tensor, layer_pass: LayerPass | None = None) -> torch.Tensor: ...
    def recompute_in_halves(self) -> bool: ...


class LayerRecompute(torch.autograd.Function):
    """out = layer(x), keeping only x and x_mid; the backward reruns each half for its own gradients.

    Inputs: x, the layer, the extra arguments of its attention branch, where to keep the MLP's gate/up
    outputs instead of recomputing them ('host': saved like x, so through the offloader; 'device': held on
    the device; '': not kept), whether to keep the attention's output and log-sum-exp the same way
    (`kept_attention`: the rerun then skips the attention forward; 'auto' where the kernel allows,
    'reference' also off CUDA, for tests, or 'off'), whether the kept attention also keeps q, k, v (the rerun
    then skips their products and RoPE), and `anchors` (tensors that require grad, e.g. the layer's adapter
    weights, so that the output requires grad even when x does not). Each branch runs with a
    `memory.layer_pass.LayerPass`: in the forward the branch's last product adds the residual in its
    epilogue and the fused ops fill the pass's `kept` (the down adapter's h A_d^T always, so the MLP's
    backward does not read h again for it); in the rerun they take from it and skip their outputs, and the
    branch's input norm adds the upstream gradient to its input's. The inner backwards accumulate parameter
    gradients straight into `.grad`, as a reentrant checkpoint does.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, layer, attn_args, keep_gate_up, keep_attention, keep_qkv, *anchors):
        kept = LayerKept()
        with torch.no_grad():
            # each branch's last projection adds the residual in its GEMM's epilogue
            x_mid = layer.attn_branch(x, *attn_args, layer_pass=LayerPass(
                residual=x, keep_attention=keep_attention, keep_qkv=keep_qkv, kept=kept))
            out = layer.mlp_branch(x_mid, layer_pass=LayerPass(
                residual=x_mid, keep_gate_up=bool(keep_gate_up), kept=kept))
        ctx.layer, ctx.attn_args = layer, attn_args
        # h A_d^T of the down adapter, (tokens, r): kept on the device (a fraction of a percent of x), held by
        # ctx as an intermediate rather than saved through the offloader
        ctx.down_a = kept.down_a
        kept_gate_up = kept.gate_up or ()
        # on the device: held by ctx, like down_a; on the host: saved, so through the offloader
        ctx.device_gate_up = kept_gate_up if keep_gate_up == "device" else ()
        if ctx.device_gate_up:
            kept_gate_up = ()
        kept_attn = kept.attention
        del kept
        ctx.n_gate_up = len(kept_gate_up)
        ctx.kept_attn = (kept_attn.backend, kept_attn.extra) if kept_attn is not None else None
        ctx.save_for_backward(x, x_mid, *kept_gate_up,
                              *(kept_attn.tensors() if kept_attn is not None else ()))
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, d_out):
        from fasttune.memory.kept_attention import KeptAttention

        x, x_mid, *rest = ctx.saved_tensors
        down_a, ctx.down_a = ctx.down_a, None
        gate_up, rest = rest[:ctx.n_gate_up], rest[ctx.n_gate_up:]
        gate_up, ctx.device_gate_up = gate_up or ctx.device_gate_up, ()
        given_attn = KeptAttention.from_tensors(rest, *ctx.kept_attn) if ctx.kept_attn is not None else None
        del rest
        layer = ctx.layer
        with torch.enable_grad():
            xm = x_mid.detach().requires_grad_(True)
            # out = x_mid + mlp(x_mid): d_out joins x_mid's gradient in the branch's norm backward
            p = LayerPass(rerun=True, grad_addend=d_out,
                          kept=LayerKept(gate_up=tuple(gate_up) if gate_up else None, down_a=down_a))
            y = layer.mlp_branch(xm, layer_pass=p)
            del gate_up, down_a, p  # the MLP's backward writes its gradients over gate/up
            torch.autograd.backward(y, d_out)
            del y
            d_mid = xm.grad
            del xm
            want_dx = ctx.needs_input_grad[0]  # not for layer 0 under a frozen embedding
            xi = x.detach().requires_grad_(want_dx)
            p = LayerPass(rerun=True, grad_addend=d_mid if want_dx else None,
                          kept=LayerKept(attention=given_attn))
            a = layer.attn_branch(xi, *ctx.attn_args, layer_pass=p)
            del given_attn, p
            torch.autograd.backward(a, d_mid)
            del a
            dx = xi.grad if want_dx else None  # x_mid = x + attn(x): d_mid joined in the norm's backward
        return dx, None, None, None, None, None, *(None for _ in ctx.needs_input_grad[6:])


def run_layers(
    layers: nn.ModuleList,
    x: torch.Tensor,
    run: Callable[[nn.Module, torch.Tensor, int], torch.Tensor],
    plan: MemoryPlan | None,
    attn_args: tuple = (),
) -> torch.Tensor:
    """x through every layer (`run(layer, x, i)`) as `plan` says (None: no layer recomputes).

    A layer planned in halves runs through `LayerRecompute` with `layer.attn_branch(x, *attn_args)` if its
    projections are all fused (`Halves.recompute_in_halves`), else as a whole layer. The non-reentrant
    checkpoint saves its tensor arguments through the saved-tensor hooks active where it is called, so the
    offloader sees exactly each layer's input x; what `run` closes over (RoPE tables, the attention mask) is
    shared by every layer and stays where it is.
    """
    if plan is None or plan.recomputed == 0:
        for i, layer in enumerate(layers):
            x = run(layer, x, i)
        return x
    offloader = LayerInputOffloader(x.device) if plan.offloads else None
    recomputed = plan.recomputed
    for i, (layer, lp) in enumerate(zip(layers, plan.layers)):
        if lp.recompute == "none":
            x = run(layer, x, i)
        elif offloader is None:
            x = checkpoint(run, layer, x, i, use_reentrant=False)
        elif lp.recompute == "halves" and layer.recompute_in_halves():
            offloader.layer, offloader.resident = i, lp.input == "device"
            # the adapter weights make the output require grad where x does not (layer 0 under a frozen
            # embedding); elsewhere x does, and walking the layer's parameters each step is host time
            anchors = () if x.requires_grad else [p for p in layer.parameters() if p.requires_grad]
            with offloader.hooks():
                x = LayerRecompute.apply(x, layer, attn_args, lp.gate_up, plan.keep_attention, plan.keep_qkv,
                                         *anchors)
        else:
            where = lp.input if lp.recompute == "whole" else \
                whole_layer_input(i, recomputed, plan.host_inputs)  # planned in halves, not all fused
            offloader.layer, offloader.resident = i, where == "device"
            with offloader.hooks():
                x = checkpoint(run, layer, x, i, use_reentrant=False)
    return x
