"""`--imatrix`: the importance matrix is each quantized layer's mean squared input over the run's training
rows (checked against transformers + PEFT), the export quantizes with it, records it as llama-quantize does,
and llama.cpp reads the file."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from export_fixtures import save_llama, save_peft_adapter

from fasttune.export.gguf import export_gguf
from fasttune.export.gguf_arch import LLAMA
from fasttune.export.imatrix import collect_imatrix
from fasttune.export.kquants import quantize_with_values
from fasttune.export.source import ExportError, iter_merged, resolve_source

Q = gguf.GGMLQuantizationType
ROWS = [
    {"instruction": f"Name colour {i}.", "input": "" if i % 2 else "Be brief.", "output": f"Blue {i}."}
    for i in range(6)
]


@pytest.fixture(scope="module")
def data_run(tmp_path_factory, tokenizer):
    """runs/data: a tiny Llama whose rows are whole super-blocks (256 columns) with an adapter, and a
    run.yaml that names its training data."""
    root = tmp_path_factory.mktemp("imatrix")
    base = save_llama(root / "base", tokenizer, hidden_size=256, intermediate_size=320, num_hidden_layers=2)
    run = root / "runs" / "data"
    save_peft_adapter(base, run / "adapter", tokenizer, template="alpaca", init_scale=0.05)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (run / "run.yaml").write_text(
        json.dumps({"model": {"model_name": str(base)}, "data": {"dataset": str(data), "template": "alpaca"}})
    )
    return {"run": run, "base": base, "data": data}


def test_imatrix_is_the_mean_square_of_each_layer_input_under_transformers_and_peft(data_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src = resolve_source(data_run["run"])
    m = collect_imatrix(src, LLAMA, rows=100)  # more than there are: every row, once
    assert (m.chunks, m.dataset) == (len(ROWS), str(data_run["data"]))
    assert set(m.values) == {
        f"blk.{i}.{t}.weight"
        for i in range(2)
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    }
    # the same rows, through transformers + PEFT, with hooks on the same layers
    from fasttune.config import load_yaml
    from fasttune.data.tokenize import build_dataset
    from fasttune.export.contract import load_contract, load_tokenizer

    cfg = load_yaml(data_run["run"] / "run.yaml")
    examples = build_dataset(cfg.data, load_tokenizer(src), 128, "train", load_contract(src)).examples
    assert sum(len(e.input_ids) for e in examples) == m.tokens
    model = AutoModelForCausalLM.from_pretrained(str(data_run["base"]), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(data_run["run"] / "adapter")).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    layers = model.base_model.model.model.layers
    for i, layer in enumerate(layers):
        for name, mod in [("attn_q", layer.self_attn.q_proj), ("ffn_down", layer.mlp.down_proj)]:
            key = f"blk.{i}.{name}.weight"
            mod.register_forward_pre_hook(lambda _m, a, key=key: seen.setdefault(key, []).append(a[0][0]))
    with torch.no_grad():
        for e in examples:
            model(torch.tensor([e.input_ids]))
    for key, xs in seen.items():
        want = torch.cat(xs).double().square().mean(0).float()
        torch.testing.assert_close(m.values[key], want, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_q4_k_m_with_imatrix_decodes_to_what_was_quantized_and_records_it(data_run, tmp_path):
    src = resolve_source(data_run["run"])
    m = collect_imatrix(src, LLAMA, rows=4)
    path = export_gguf(data_run["run"], tmp_path / "m.gguf", type="q4_k_m", imatrix=m)
    plain = export_gguf(data_run["run"], tmp_path / "plain.gguf", type="q4_k_m")
    reader = gguf.GGUFReader(path)
    fields = {k: reader.fields[k].contents() for k in reader.fields if k.startswith("quantize.imatrix.")}
    assert fields == {
        "quantize.imatrix.dataset": str(data_run["data"]),
        "quantize.imatrix.entries_count": 14,
        "quantize.imatrix.chunks_count": 4,
    }
    assert not any(k.startswith("quantize.") for k in gguf.GGUFReader(plain).fields)
    tensors = {t.name: t for t in reader.tensors}
    plain_tensors = {t.name: t for t in gguf.GGUFReader(plain).tensors}
    merged = dict(iter_merged(src))
    for key, name in [
        ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight"),  # Q6_K (first layer of two)
        ("model.layers.1.self_attn.o_proj.weight", "blk.1.attn_output.weight"),  # Q4_K
    ]:
        t = tensors[name]
        raw, values = quantize_with_values(merged[key], t.tensor_type, m.values[name])
        np.testing.assert_array_equal(np.asarray(t.data).reshape(raw.shape), raw)
        decoded = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(values.shape)
        np.testing.assert_array_equal(decoded, values.numpy())

        # the error the imatrix weighs (the change of the layer's output over the training inputs) is lower
        def cost(tensor, w=merged[key], imp=m.values[name]) -> float:
            d = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(w.shape)
            return float(((torch.from_numpy(d) - w).square() * imp).sum())

        assert cost(t) < cost(plain_tensors[name]), name


def test_llama_cpp_reads_the_imatrix_file_as_the_gguf_package_does(llama_cpp, data_run, tokenizer, tmp_path):
    """Q5_0/Q5_1 blocks come from fasttune's quantizer with an imatrix: llama.cpp's reading of them gives
    the greedy answer transformers computes from the gguf package's decoding of the same file."""
    from transformers import AutoModelForCausalLM

    base = save_llama(tmp_path / "b", tokenizer)  # 64 columns: K-quant rows fall back to Q5_0/Q5_1
    run = tmp_path / "runs" / "r"
    save_peft_adapter(base, run / "adapter", tokenizer, template="alpaca", init_scale=0.05)
    (run / "run.yaml").write_text(
        json.dumps({"model": {"model_name": str(base)}, "data": {"dataset": str(data_run["data"])}})
    )
    path = export_gguf(run, tmp_path / "m.gguf", type="q5_k_m", imatrix=3)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == Q.Q5_1  # 64 columns: the Q5_K fallback, with the imatrix
    ids = list(range(3, 15))
    got = llama_cpp.results(path, [{"op": "logprobs", "tokens": ids, "full": True}])[0]["vectors"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
    got = torch.tensor([[v if v is not None else -1e9 for v in row] for row in got], dtype=torch.float64)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert float((got.exp() - want.exp()).abs().max()) < 2e-3


def test_imatrix_needs_a_k_quant_type_and_training_data(data_run, run_dir, tmp_path):
    with pytest.raises(ExportError, match="--imatrix: applies to the K-quant types .* not --type q8_0"):
        export_gguf(data_run["run"], tmp_path / "x.gguf", type="q8_0", imatrix=4)
    with pytest.raises(ExportError, match="names no training dataset"):
        export_gguf(run_dir, tmp_path / "x.gguf", type="q4_k_m", imatrix=4)
    with pytest.raises(ExportError, match="at least 1"):
        export_gguf(data_run["run"], tmp_path / "x.gguf", type="q4_k_m", imatrix=0)
    assert not (tmp_path / "x.gguf").exists()


def test_cli_imatrix_errors_exit_2(data_run, tmp_path, capsys):
    from fasttune.cli import main

    out = str(tmp_path / "x.gguf")
    code = main(["export", "gguf", str(data_run["run"]), "--out", out, "--type", "f16", "--imatrix", "8"])
    assert code == 2
    assert "--imatrix: applies to the K-quant types" in capsys.readouterr().err
