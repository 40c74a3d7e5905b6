"""Streaming text never shows half a character, and the pieces joined are exactly the decoded tokens."""

from __future__ import annotations

import torch
from infer_models import make_model

from fasttune.infer.generate import GenerationStats, generate
from fasttune.infer.stream import IncrementalDetokenizer, StopTrimmer, TextStream, stream

TEXTS = [
    "안녕하세요, 세계! 오늘 날씨가 정말 좋네요.",
    "Party 🎉👩‍👩‍👧 time 🇰🇷🇯🇵 done ✅",
    "Mixed: 한국어 and emoji 😀 and 日本語 and café.",
]


def pieces_of(tokenizer, ids, skip_special_tokens=True):
    d = IncrementalDetokenizer(tokenizer, skip_special_tokens)
    return [d.push(i) for i in ids] + [d.flush()]


def test_korean_and_emoji_stream_without_broken_characters(smollm2_tokenizer):
    for text in TEXTS:
        ids = smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) > len(text.split())  # byte-level BPE really splits these characters
        pieces = pieces_of(smollm2_tokenizer, ids)
        assert "".join(pieces) == smollm2_tokenizer.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)
        assert pieces.count("") >= 2  # some tokens were held back until their character was complete


def test_random_token_sequences_join_to_the_full_decode(smollm2_tokenizer):
    g = torch.Generator().manual_seed(0)
    vocab = len(smollm2_tokenizer)
    for _ in range(5):
        ids = torch.randint(0, vocab, (200,), generator=g).tolist()
        for skip in (True, False):
            assert "".join(pieces_of(smollm2_tokenizer, ids, skip)) == smollm2_tokenizer.decode(
                ids, skip_special_tokens=skip)


def test_stop_trimmer_cuts_at_the_stop_and_holds_back_possible_starts():
    t = StopTrimmer(["### Instruction:"])
    out = [t.feed("Hello ##"), t.feed("# Inst"), t.feed("ruction: more"), t.feed("never")]
    assert out == ["Hello ", "", "", ""] and t.stopped
    t = StopTrimmer(["### Instruction:"])
    assert [t.feed("a #"), t.feed("# b"), t.flush()] == ["a ", "## b", ""]
    t = StopTrimmer(["END"])
    assert t.feed("x E") == "x " and t.flush() == "E"


def test_text_stream_of_korean_tokens(smollm2_tokenizer):
    text = TEXTS[0] + " 끝"
    ids = smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    stream_ = TextStream(iter(torch.tensor([[i]]) for i in ids), smollm2_tokenizer, ["오늘"], True,
                         GenerationStats())
    pieces = list(stream_)
    assert "".join(pieces) == stream_.text == text[:text.index("오늘")]
    assert not any("\ufffd" in p for p in pieces)


def test_stream_equals_generate_text(smollm2_tokenizer):
    model = make_model()
    prompt = [5, 17, 42, 8, 60]
    ids = generate(model, torch.tensor([prompt]), max_new_tokens=15, eos_token_ids=[])[0, 5:].tolist()
    finished = []
    s = stream(model, smollm2_tokenizer, prompt, max_new_tokens=15, eos_token_ids=[],
               on_finish=finished.append)
    pieces = list(s)
    assert s.token_ids == ids
    assert "".join(pieces) == s.text == smollm2_tokenizer.decode(ids, skip_special_tokens=True)
    assert finished == [s] and s.stats.new_tokens == 15 and s.stats.tokens_per_s > 0


def test_stream_trims_the_stop_string(smollm2_tokenizer):
    model = make_model()
    prompt = [5, 17, 42, 8, 60]
    full = stream(model, smollm2_tokenizer, prompt, max_new_tokens=15, eos_token_ids=[]).read_all()
    stop = full[6:9]
    trimmed = stream(model, smollm2_tokenizer, prompt, max_new_tokens=15, eos_token_ids=[],
                     stop_strings=[stop]).read_all()
    assert trimmed == full[:full.index(stop)]
