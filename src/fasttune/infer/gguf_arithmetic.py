"""The arithmetic llama.cpp's CPU backend applies to an f16 or bf16 GGUF export, in PyTorch: the reference a
16-bit export's answers in llama.cpp are compared with (`fasttune generate --as_gguf bf16`).

ggml's CPU matrix product with an F16 or BF16 weight first converts its fp32 input to the weight's type
(the type's `vec_dot_type`; round to nearest even), multiplies the two exactly and sums in fp32; the
embedding rows are read exactly; norms, RoPE, attention's softmax and the residual stream stay fp32.
So, on a fp32 model: fold the adapter into the weights as the export does (in fp32), round every weight
matrix to the type, and round the input of every linear layer to it. What is not reproduced is the order
of the fp32 sums (ggml's SIMD lanes against PyTorch's kernels) and llama.cpp's f16 key/value cache; both
move a logit by about fp32's and f16's rounding of it, and the tests measure that no greedy answer on
their prompts turns on it.
"""

from __future__ import annotations

import torch
from torch import nn

GGUF_ARITHMETIC = {"f16": torch.float16, "bf16": torch.bfloat16}


def _linear_types() -> tuple[type, ...]:
    try:  # GPT-2's fused projections: a matrix product like nn.Linear, weight stored (in, out)
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


@torch.no_grad()
def use_gguf_arithmetic(model: nn.Module, type: str) -> list[torch.utils.hooks.RemovableHandle]:
    """In place, on a fp32 model: merge fasttune's LoRA layers, round every weight matrix to `type` (f16 or
    bf16) and the input of every linear layer to it. A PEFT model must be merged by the caller
    (merge_and_unload). Returns the hooks' handles."""
    from fasttune.lora.apply import lora_modules

    if type not in GGUF_ARITHMETIC:
        raise ValueError(f"--as_gguf {type}: expected one of {', '.join(GGUF_ARITHMETIC)}")
    dtype = GGUF_ARITHMETIC[type]
    params = list(model.parameters())
    if any(p.dtype != torch.float32 for p in params):
        found = sorted({str(p.dtype).removeprefix("torch.") for p in params} - {"float32"})
        raise ValueError(f"--as_gguf {type} computes in fp32 with {type} weights; the model holds {found}")
    for _, m in lora_modules(model):
        if not m.merged:
            m.merge()
    if hasattr(model, "set_use_kernels"):  # fused kernels would bypass the linear layers' hooks
        model.set_use_kernels(False)
    for p in params:
        if p.dim() >= 2:
            p.copy_(p.to(dtype).to(torch.float32))

    def round_input(_module, args):
        return (args[0].to(dtype).to(args[0].dtype), *args[1:])

    kinds = _linear_types()
    return [m.register_forward_pre_hook(round_input) for m in model.modules() if isinstance(m, kinds)]
