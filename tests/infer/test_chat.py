"""Chat: the conversation is rendered with the chat template, replies join the history, the REPL obeys
/reset and /exit and reads any stream of lines."""

from __future__ import annotations

import io

import pytest
from infer_models import real_vocab_model

from fasttune.data.templates import make_contract
from fasttune.infer.chat import ChatSession, repl


@pytest.fixture
def session(smollm2_tokenizer):
    return ChatSession(real_vocab_model(), smollm2_tokenizer, eos_token_ids=[], max_new_tokens=6)


def test_prompt_is_the_chat_template_of_the_history(session, smollm2_tokenizer):
    first = session.send("Hello there").read_all()
    ids = session.prompt_ids("And now?")
    messages = [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": first.strip()},
        {"role": "user", "content": "And now?"},
    ]
    text = smollm2_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ids == smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_history_grows_only_once_the_reply_is_read_and_reset_clears_it(session):
    reply = session.send("one")
    assert session.messages == []
    text = reply.read_all()
    assert session.messages == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": text.strip()},
    ]
    session.reset()
    assert session.messages == []


def test_system_message_comes_first(smollm2_tokenizer):
    s = ChatSession(
        real_vocab_model(), smollm2_tokenizer, system="Be brief.", eos_token_ids=[], max_new_tokens=2
    )
    text = smollm2_tokenizer.decode(s.prompt_ids("hi"))
    assert text.index("Be brief.") < text.index("hi")


def test_oldest_turns_are_dropped_to_fit_the_context(smollm2_tokenizer):
    s = ChatSession(real_vocab_model(), smollm2_tokenizer, eos_token_ids=[], max_new_tokens=4, max_context=70)
    for word in ("alpha", "bravo", "charlie", "delta"):
        s.send(word + " " * 3 + "x" * 20).read_all()
    ids = s.prompt_ids("echo")
    assert len(ids) <= 70 - 4 and s.dropped_turns > 0
    assert "alpha" not in smollm2_tokenizer.decode(ids) and "echo" in smollm2_tokenizer.decode(ids)


def test_alpaca_contract_renders_turns_as_alpaca_blocks(smollm2_tokenizer):
    contract = make_contract("alpaca", "alpaca", smollm2_tokenizer)
    s = ChatSession(
        real_vocab_model(), smollm2_tokenizer, contract=contract, eos_token_ids=[], max_new_tokens=2
    )
    text = smollm2_tokenizer.decode(s.prompt_ids("What is a tide-harp?"))
    assert "### Instruction:\nWhat is a tide-harp?\n\n### Response:\n" in text


def test_repl_reads_lines_resets_and_exits(session):
    lines = io.StringIO("hi\n\n/reset\nhello\n/nope\n/exit\nnever read\n")
    out, err = io.StringIO(), io.StringIO()
    assert repl(session, lines, out, err) == 2
    replies = out.getvalue().split("\n")[:2]
    assert session.messages[-1]["content"] == replies[1].strip()
    assert len(session.messages) == 2  # /reset dropped the first exchange
    log = err.getvalue()
    assert "(conversation cleared)" in log and "unknown command /nope" in log and log.count("tokens/s") == 2


def test_a_tokenizer_without_chat_template_is_refused(smollm2_tokenizer):
    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="chat template"):
        ChatSession(real_vocab_model(), NoTemplate())


def test_printed_replies_drop_only_outer_blank_space():
    from fasttune.infer.chat import write_pieces

    out = io.StringIO()
    write_pieces(["\n ", "Hello", " ", "", "world", "\n\n", "again", "  \n", "\n"], out)
    assert out.getvalue() == "Hello world\n\nagain\n"
