"""The check after every export: a held-out prompt decoded greedily from the artifact and from base + adapter.

The reference is transformers + PEFT on the base checkpoint (the unmerged adapter), so the check also
crosses libraries. The exported side reads the artifact as a user would: the merged directory with
`AutoModelForCausalLM`; a GGUF file with the real llama.cpp (node-llama-cpp, see llamacpp.py) where it is
installed, else through transformers' GGUF reader. Either way the artifact's own tokenizer encodes the
prompt too, and the result names the reader and the reference. An f16 or bf16 file read by llama.cpp is
compared with the reference computed as llama.cpp's CPU backend computes that file (adapter merged, weights
and each matrix product's input rounded to the type: infer/gguf_arithmetic.py), so that the answers must
be identical; every other artifact with the fp32 reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fasttune.data.templates import PromptContract, encode_prompt, render_messages, render_prompt
from fasttune.export.contract import load_contract, load_tokenizer, stop_token_ids
from fasttune.export.llamacpp import find_llamacpp, greedy_request
from fasttune.export.source import ExportError, ExportSource, resolve_source

FALLBACK_PROMPT = "Explain in one sentence what you can help with."


@dataclass
class CheckResult:
    artifact: str
    prompt: str
    reference_ids: list[int]
    exported_ids: list[int]
    reference_text: str
    exported_text: str
    stop_ids: list[int] = field(default_factory=list)
    prompt_ids_match: bool = True  # the artifact's tokenizer encodes the prompt as the run's did
    reader: str = "transformers"  # what read the artifact
    reference: str = "transformers + PEFT, fp32"  # how the reference answer was computed

    @property
    def agreement(self) -> float:
        """Share of generated positions where the two agree (over the longer output)."""
        n = max(len(self.reference_ids), len(self.exported_ids), 1)
        return sum(a == b for a, b in zip(self.reference_ids, self.exported_ids)) / n

    @property
    def identical(self) -> bool:
        return self.reference_ids == self.exported_ids

    @property
    def eos_reference(self) -> bool:
        return bool(self.reference_ids) and self.reference_ids[-1] in self.stop_ids

    @property
    def eos_exported(self) -> bool:
        return bool(self.exported_ids) and self.exported_ids[-1] in self.stop_ids

    def summary(self) -> str:
        verdict = "identical" if self.identical else f"{self.agreement:.0%} of tokens agree"
        lines = [
            f"check: {self.artifact} (read by {self.reader}): greedy answer {verdict} with base + adapter "
            f"({self.reference}; EOS reached: exported {'yes' if self.eos_exported else 'no'}, "
            f"reference {'yes' if self.eos_reference else 'no'})",
            f"  prompt:    {self.prompt.strip()[-200:]!r}",
            f"  exported:  {self.exported_text!r}",
        ]
        if not self.identical:
            lines.append(f"  reference: {self.reference_text!r}")
        if not self.prompt_ids_match:
            lines.append("  warning: the artifact's tokenizer encodes the prompt differently from the run's")
        return "\n".join(lines)


def _eval_source(data: dict) -> str | None:
    """The run's held-out data as training chose it: eval_dataset, or for 'auto' a built-in's eval split."""
    source, train = data.get("eval_dataset"), str(data.get("dataset") or "")
    if source in (None, "", "none"):
        return None
    if source == "auto":
        return train if train.startswith("builtin:") else None
    return str(source)


def _first_question(source: str, data: dict) -> dict[str, Any] | None:
    from fasttune.data.sources import read_rows

    instruction, inp = data.get("instruction_field", "instruction"), data.get("input_field", "input")
    messages = data.get("messages_field", "messages")
    split = "eval" if source.startswith("builtin:") else None
    for _, row in read_rows(source, split):
        if not isinstance(row, dict):
            continue
        if isinstance(row.get(instruction), str):
            return {"instruction": row[instruction], "input": str(row.get(inp) or "")}
        turns = row.get(messages)
        if isinstance(turns, list) and any(isinstance(m, dict) and m.get("role") == "user" for m in turns):
            last = max(i for i, m in enumerate(turns) if isinstance(m, dict) and m.get("role") == "user")
            return {"messages": turns[: last + 1]}
    return None


def held_out_prompt(src: ExportSource, contract: PromptContract | None, tokenizer: Any) -> str:
    """The first held-out question of the run (its eval set, or the embedded one), rendered as in training."""
    data = src.run_yaml.get("data") or {}
    source = _eval_source(data)
    question = None
    if source:
        try:
            question = _first_question(source, data)
        except Exception:  # the check must not fail because the eval file moved: use the fallback
            question = None
    question = question or {"instruction": FALLBACK_PROMPT, "input": ""}
    if contract is None:
        turns = question.get("messages") or [{"role": "user", "content": question["instruction"]}]
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return turns[-1]["content"]
    if "messages" in question:
        return render_messages(question["messages"], contract, tokenizer)
    return render_prompt(question["instruction"], question["input"], contract, tokenizer)


@torch.no_grad()
def _greedy(model: Any, ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(
        x,
        attention_mask=torch.ones_like(x),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids or None,
        pad_token_id=stop_ids[0] if stop_ids else 0,
    )
    return out[0, len(ids) :].tolist()


def _cut(ids: list[int], stop_ids: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[: i + 1]
    return ids


def reference_model(src: ExportSource, as_gguf: str | None = None) -> Any:
    """transformers base + PEFT adapter (unmerged), fp32, eval mode; with as_gguf (f16 or bf16) merged and
    computed as llama.cpp's CPU backend computes that GGUF type."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src.base_dir), dtype=torch.float32)
    if src.adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(src.adapter_dir))
        if as_gguf is not None:
            model = model.merge_and_unload()
    if as_gguf is not None:
        from fasttune.infer.gguf_arithmetic import use_gguf_arithmetic

        use_gguf_arithmetic(model, as_gguf)
    return model.eval()


def _gguf_16bit_type(path: Path) -> str | None:
    """'f16' or 'bf16' for a file of that type (general.file_type), else None."""
    import gguf

    field = gguf.GGUFReader(path).fields.get("general.file_type")
    kind = int(field.contents()) if field is not None else None
    return {int(gguf.LlamaFileType.MOSTLY_F16): "f16", int(gguf.LlamaFileType.MOSTLY_BF16): "bf16"}.get(kind)


def _transformers_reads(path: Path) -> None:
    import gguf

    arch = gguf.GGUFReader(path).fields["general.architecture"].contents()
    if arch not in ("llama", "qwen2", "qwen3"):
        raise ExportError(
            f"{path}: the check reads a {arch} GGUF with llama.cpp only, which is not installed "
            "(scripts/setup_llamacpp.sh); pass --no_check to skip the check"
        )


def check_export(
    run_or_adapter: str | Path,
    artifact: str | Path,
    *,
    base: str | None = None,
    max_new_tokens: int = 24,
    prompt: str | None = None,
    use_llamacpp: bool = True,
) -> CheckResult:
    """Decode one prompt greedily from `artifact` (merged dir or .gguf) and from base + adapter; compare.

    use_llamacpp: read a .gguf with llama.cpp when it is installed (else, or when False, transformers).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_source(run_or_adapter, base=base)
    tokenizer = load_tokenizer(src)
    contract = load_contract(src)
    text = prompt if prompt is not None else held_out_prompt(src, contract, tokenizer)
    ids = (
        encode_prompt(text, contract, tokenizer)
        if contract is not None
        else tokenizer(text, add_special_tokens=True)["input_ids"]
    )
    stops = stop_token_ids(contract, tokenizer)

    artifact = Path(artifact)
    llama_cpp = find_llamacpp() if artifact.suffix == ".gguf" and use_llamacpp else None
    if llama_cpp is not None:
        tokenized, generated = llama_cpp.results(
            artifact,
            [
                {"op": "tokenize", "text": text, "special": True},
                greedy_request(ids, max_new_tokens, stops),
            ],
        )
        art_ids, got, reader = tokenized["tokens"], _cut(generated["tokens"], stops), llama_cpp.name
    else:
        if artifact.suffix == ".gguf":
            _transformers_reads(artifact)
            kw = dict(gguf_file=artifact.name)
            exported = AutoModelForCausalLM.from_pretrained(
                str(artifact.parent), dtype=torch.float32, **kw
            ).eval()
            art_tok = AutoTokenizer.from_pretrained(str(artifact.parent), **kw)
            reader = "transformers (GGUF reader; llama.cpp not installed: scripts/setup_llamacpp.sh)"
        else:
            exported = AutoModelForCausalLM.from_pretrained(str(artifact), dtype=torch.float32).eval()
            art_tok = AutoTokenizer.from_pretrained(str(artifact))
            reader = "transformers"
        art_ids = art_tok(text, add_special_tokens=False)["input_ids"]
        got = _cut(_greedy(exported, ids, max_new_tokens, stops), stops)
        del exported
    plain_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    as_gguf = _gguf_16bit_type(artifact) if llama_cpp is not None else None
    ref = _cut(_greedy(reference_model(src, as_gguf), ids, max_new_tokens, stops), stops)
    return CheckResult(
        artifact=str(artifact),
        prompt=text,
        reference_ids=ref,
        exported_ids=got,
        reference_text=tokenizer.decode(ref, skip_special_tokens=False),
        exported_text=tokenizer.decode(got, skip_special_tokens=False),
        stop_ids=stops,
        prompt_ids_match=art_ids == plain_ids,
        reader=reader,
        reference=(
            f"transformers + PEFT merged, computed as llama.cpp's CPU backend computes a {as_gguf} file"
            if as_gguf
            else "transformers + PEFT, fp32"
        ),
    )
