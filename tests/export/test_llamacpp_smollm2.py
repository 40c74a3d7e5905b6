"""The embedded SmolLM2-135M with a fasttune LoRA adapter, exported and run in the real llama.cpp
(node-llama-cpp): greedy answers to held-out questions against `fasttune generate`'s, EOS, tokenization of
Korean, emoji and code, special tokens and the chat template llama.cpp applies."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow

# Share of generated positions where llama.cpp's greedy answer equals fasttune's, over four held-out
# questions. The reference for f16 and bf16 is `fasttune generate --as_gguf TYPE`: the adapter merged, the
# weights and the input of each matrix product rounded to the type, fp32 sums and fp32 elsewhere, as
# llama.cpp's CPU backend computes such a file. Not modelled: the order of ggml's fp32 sums and its attention
# (f16 key/value cache, flash attention's f16 accumulator), which move a logit by about 0.01 here. So an
# answer may part from the reference only where the reference's top two logits are within TIE of each other;
# everywhere else the tokens must be the same, EOS included. Measured on this model and adapter: f16 4 of 4
# answers identical. bf16 depends on the CPU: where ggml has AVX2 only, 3 of 4, the fourth parting at token
# 18 of 40 where the reference's two candidates are 0.0001 apart (0.87 of all positions agree; against
# fasttune's fp32 answers, 0.81); where it has AVX512_BF16 (native bf16 dot products), 2 of 4, parting at
# tokens 10 and 31 where they are 0.040 and 0.006 apart (0.81 agree). The quantized types are compared with
# fasttune's fp32 answers, to a bound below what was measured (q8_0 0.53 and 0.73, q4_k_m 0.26 and 0.18).
# Every type is read by llama.cpp in test_llamacpp.py; here the shipped ones.
MIN_AGREEMENT = {"f16": 1.0, "bf16": 0.75, "q8_0": 0.4, "q4_k_m": 0.15}
REFERENCE = {"f16": "f16", "bf16": "bf16", "q8_0": None, "q4_k_m": None}  # --as_gguf of each type's reference
TIE = 0.05  # logits
TEXTS = [
    "안녕하세요! 오늘 날씨가 좋네요. 조율은 어렵습니다.",
    "Emoji: 🙂🚀👍🏽 and 🦙🦙 — “quotes”",
    "def f(x):\n    return {'a': [1, 22, 333]}\n\tif x != 0: pass",
    "Tabs\tand   runs of    spaces\n\n\n  end 12345 3.14159",
    "Ünïcödé façade naïve",
]
CHAT = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "What is the tide-harp?"},
    {"role": "assistant", "content": "A seven-string instrument."},
    {"role": "user", "content": "Who builds it?"},
]


@pytest.fixture(scope="module")
def smol(smollm_run, tmp_path_factory):
    """GGUF files of the run, the held-out prompts and fasttune's greedy answers to them."""
    from fasttune.data.builtin import builtin_file
    from fasttune.data.templates import encode_prompt, render_prompt
    from fasttune.export.gguf import export_gguf
    from fasttune.infer.generate import generate
    from fasttune.infer.load import load_for_inference

    out = tmp_path_factory.mktemp("smol-gguf")
    paths = {t: export_gguf(smollm_run["run"], out / f"smol.{t}.gguf", type=t) for t in MIN_AGREEMENT}
    im = load_for_inference(run=smollm_run["run"], device="cpu", dtype="fp32")
    rows = [json.loads(line) for line in builtin_file("builtin:lumen", "eval").read_text().splitlines()[:4]]
    prompts = [
        encode_prompt(
            render_prompt(r["instruction"], r.get("input", ""), im.contract, im.tokenizer),
            im.contract,
            im.tokenizer,
        )
        for r in rows
    ]
    stops = list(im.eos_token_ids)
    answers, models = {}, {}
    for as_gguf in set(REFERENCE.values()):
        run = smollm_run["run"]
        ref = im if as_gguf is None else load_for_inference(run=run, device="cpu", as_gguf=as_gguf)
        models[as_gguf] = ref.model
        answers[as_gguf] = []
        for ids in prompts:
            x = torch.tensor([ids])
            full = generate(ref.model, x, max_new_tokens=40, eos_token_ids=stops, compile=False)
            answer = full[0, len(ids) :].tolist()
            cut = next((i + 1 for i, t in enumerate(answer) if t in stops), len(answer))
            answers[as_gguf].append(answer[:cut])
    return {
        "paths": paths, "prompts": prompts, "answers": answers, "stops": stops, "im": im, "models": models
    }


def _agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(len(a), len(b), 1)


def test_greedy_answers_match_fasttune_generate(llama_cpp, smol):
    jobs = [
        (
            p,
            [
                {"op": "generate", "tokens": ids, "max_tokens": 40, "stop_ids": smol["stops"]}
                for ids in smol["prompts"]
            ],
        )
        for p in smol["paths"].values()
    ]
    got = dict(zip(smol["paths"], llama_cpp.run(jobs)["jobs"]))
    report = {}
    for kind, results in got.items():
        refs = smol["answers"][REFERENCE[kind]]
        agree = [_agreement(r["tokens"], ref) for r, ref in zip(results, refs)]
        report[kind] = round(sum(agree) / len(agree), 3)
    fp32 = smol["answers"][None]
    print(report, [len(a) for a in fp32], [a[-1] in smol["stops"] for a in fp32])
    for kind in got:
        assert report[kind] >= MIN_AGREEMENT[kind], (kind, report)
    for kind in ("f16", "bf16"):  # token for token, EOS included, except after a tie in the reference
        for prompt, r, ref in zip(smol["prompts"], got[kind], smol["answers"][kind]):
            if r["tokens"] == ref:
                continue
            k = next(i for i, (a, b) in enumerate(zip(r["tokens"] + [-1], ref + [-1])) if a != b)
            with torch.no_grad():
                logits = smol["models"][kind](torch.tensor([prompt + ref[:k]])).logits[0, -1]
            both = k < min(len(ref), len(r["tokens"]))  # else one stopped where the other went on
            margin = float(logits[ref[k]] - logits[r["tokens"][k]]) if both else float("inf")
            print(kind, "parts at", k, "margin", margin)
            assert margin < TIE, (kind, k, margin)
    assert any(ref[-1] in smol["stops"] for ref in smol["answers"]["bf16"])


def test_tokenization_special_tokens_and_chat_template(llama_cpp, smol):
    tok, contract = smol["im"].tokenizer, smol["im"].contract
    special = "<|im_start|>user\nhi<|im_end|>\n"
    requests = [{"op": "tokenize", "text": t} for t in TEXTS]
    requests += [
        {"op": "tokenize", "text": special, "special": True},
        {"op": "meta"},
        {"op": "chat_template", "messages": CHAT},
    ]
    answers = llama_cpp.results(smol["paths"]["q8_0"], requests)
    for text, got in zip(TEXTS, answers):
        assert got["tokens"] == tok.encode(text, add_special_tokens=False), text
    assert answers[len(TEXTS)]["tokens"] == tok.encode(special, add_special_tokens=False)
    meta = answers[len(TEXTS) + 1]
    assert (meta["eos"], meta["bos"]) == (contract.eos_id, tok.bos_token_id)
    assert meta["chat_template"] == contract.chat_template
    chat = answers[len(TEXTS) + 2]
    want = tok.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True, chat_template=contract.chat_template
    )
    assert chat["text"] == want
