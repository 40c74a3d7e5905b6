"""`model.generate(**kwargs)` as notebooks call it: transformers' argument names and defaults, mapped onto
fasttune's `generate` (our model) or handed to transformers' own (the generic path).

Defaults follow transformers: the model's generation_config.json first, then top_k=50, top_p=1.0,
temperature=1.0 and max_length=20 when nothing says otherwise. An argument that would change the output
and is not implemented (beam search, min_new_tokens, ...) is an error that names it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

SUPPORTED = {
    "max_new_tokens",
    "max_length",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "use_cache",
    "streamer",
    "eos_token_id",
    "pad_token_id",
    "bos_token_id",
    "stop_strings",
    "tokenizer",
    "num_return_sequences",
    "seed",
    "compile",
    "generation_config",
    "output_scores",
    "return_dict_in_generate",
    "num_beams",
}


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move right padding to the left, so that every row ends where generation continues.

    ids  a b c          mask 1 1 1        ->   a b c      1 1 1
         d e pad             1 1 0             pad d e    0 1 1
    """
    mask = attention_mask.bool()
    if bool((mask[:, :-1] <= mask[:, 1:]).all()):  # already left-padded (or no padding)
        return input_ids, attention_mask
    trailing = (~mask).flip(1).cumprod(1).sum(1)  # (B,) pads after the last real token
    idx = (
        torch.arange(input_ids.shape[1], device=input_ids.device)[None] - trailing[:, None]
    ) % input_ids.shape[1]
    return input_ids.gather(1, idx), attention_mask.gather(1, idx)


def _settings(model: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    from fasttune.notebook.model import generation_defaults

    unknown = sorted(set(kwargs) - SUPPORTED - {"token_type_ids"})
    if unknown:
        raise ValueError(
            f"generate: {', '.join(unknown)} not supported by fasttune (greedy and sampling with "
            "temperature, top_k, top_p, min_p, repetition_penalty, stop strings)"
        )
    kwargs.pop("token_type_ids", None)  # some tokenizers return it; decoder-only models do not read it
    gc = kwargs.pop("generation_config", None)
    settings = {**generation_defaults(model), **(gc.to_diff_dict() if gc is not None else {})}
    settings.update({k: v for k, v in kwargs.items() if v is not None})
    if int(settings.get("num_beams") or 1) != 1:
        raise ValueError(f"generate: num_beams={settings['num_beams']} (beam search) is not supported")
    for flag in ("output_scores", "return_dict_in_generate"):
        if settings.get(flag):
            raise ValueError(f"generate: {flag}=True is not supported; generate returns the token ids")
    return settings


@torch.no_grad()
def notebook_generate(
    model: Any, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, **kwargs: Any
) -> torch.Tensor:
    """(B, T + n) prompt and generated ids, like transformers' generate."""
    from fasttune.infer.generate import generate

    if input_ids is None:
        raise ValueError(
            "generate: input_ids is required (model.generate(**tokenizer([...], return_tensors='pt')))"
        )
    if isinstance(input_ids, Mapping) and "input_ids" in input_ids:
        # tokenizer.apply_chat_template(..., return_tensors="pt") returns a BatchEncoding in transformers 5,
        # which the notebooks pass as input_ids: its ids, and its mask unless one is given
        encoding = input_ids
        input_ids = encoding["input_ids"]
        if attention_mask is None:
            attention_mask = encoding.get("attention_mask")
    s = _settings(model, kwargs)
    tokenizer = s.get("tokenizer") or model.tokenizer
    device = model.device
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    input_ids, attention_mask = left_align(input_ids, attention_mask)
    n = int(s.get("num_return_sequences") or 1)
    if n > 1:
        input_ids, attention_mask = input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0)
    if s.get("max_new_tokens") is not None:
        max_new = int(s["max_new_tokens"])
    else:
        max_new = int(s.get("max_length") or 20) - input_ids.shape[1]
    eos = s.get("eos_token_id", tokenizer.eos_token_id)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    do_sample = bool(s.get("do_sample", False))
    was_training = model.training
    model.eval()  # no dropout while generating, whatever mode the notebook left the model in
    try:
        return generate(
            model.model,
            input_ids,
            attention_mask,
            max_new_tokens=max(0, max_new),
            do_sample=do_sample,
            temperature=float(s.get("temperature", 1.0)),
            top_p=float(s.get("top_p", 1.0)),
            top_k=int(s.get("top_k", 50)) if do_sample else 0,
            min_p=float(s.get("min_p") or 0.0) if do_sample else 0.0,
            repetition_penalty=float(s.get("repetition_penalty", 1.0)),
            eos_token_ids=eos,
            pad_token_id=s.get("pad_token_id", tokenizer.pad_token_id),
            stop_strings=s.get("stop_strings"),
            tokenizer=tokenizer,
            seed=s.get("seed"),
            streamer=s.get("streamer"),
            compile=s["compile"] if s.get("compile") is not None else "auto",
        )
    finally:
        model.train(was_training)
