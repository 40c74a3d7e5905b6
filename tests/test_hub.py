"""Hub uploads go through huggingface_hub to a local stand-in of the Hub's upload endpoints (hub_stub.py):
the repository is created, and one commit carries exactly the files, the model card and the token."""

from __future__ import annotations

import pytest
from hub_stub import TOKEN, running_stub
from huggingface_hub import ModelCard

from fasttune.cli import main
from fasttune.hub import HubError, gguf_card_path, push_path


def _local_files(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_push_a_run_sends_its_adapter_and_a_card_for_the_repo(tiny_run, capsys):
    with running_stub() as stub:
        assert main(["push", str(tiny_run), "--repo", "me/tiny-adapter", "--token", TOKEN, "--private",
                     "--endpoint", stub.url]) == 0
    assert stub.created == [{"name": "tiny-adapter", "organization": "me", "visibility": "private"}]
    (commit,) = stub.commits
    assert (commit.repo_id, commit.revision, commit.summary) == ("me/tiny-adapter", "main",
                                                                 "Upload adapter with fasttune")
    local = _local_files(tiny_run / "adapter")
    assert set(commit.files) == set(local)
    for name in local:
        if name != "README.md":
            assert commit.files[name] == local[name], name
    card = ModelCard(commit.files["README.md"].decode())
    assert card.data.library_name == "peft"
    assert 'PeftModel.from_pretrained(base, "me/tiny-adapter")' in card.text
    assert all(h["authorization"] == f"Bearer {TOKEN}" for _, _, h in stub.requests)
    assert all("fasttune/" in h["user-agent"] and "hf_hub/" in h["user-agent"] for _, _, h in stub.requests)
    assert [path for _, path, _ in stub.requests][-1] == "/api/models/me/tiny-adapter/commit/main"
    assert "pushed" in capsys.readouterr().out


def test_push_a_gguf_sends_the_file_and_its_card_as_readme(tmp_path):
    gguf = tmp_path / "model-q8_0.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)))
    gguf_card_path(gguf).write_text("---\nlibrary_name: gguf\n---\n\n# card\n")
    with running_stub() as stub:
        push_path(gguf, "me/tiny-gguf", token=TOKEN, endpoint=stub.url, revision="v1")
    (commit,) = stub.commits
    assert commit.revision == "v1"
    assert commit.files == {"model-q8_0.gguf": gguf.read_bytes(),
                            "README.md": gguf_card_path(gguf).read_bytes()}


def test_push_a_merged_directory_sends_every_file(tmp_path):
    merged = tmp_path / "merged"
    (merged / "sub").mkdir(parents=True)
    (merged / "config.json").write_text("{}")
    (merged / "README.md").write_text("---\nlibrary_name: transformers\n---\n")
    (merged / "sub" / "x.bin").write_bytes(b"\x00\x01")
    with running_stub() as stub:
        push_path(merged, "me/merged", token=TOKEN, endpoint=stub.url, commit_message="first")
    assert stub.commits[0].files == _local_files(merged) and stub.commits[0].summary == "first"


def test_refusals_are_one_line_errors(tmp_path, capsys):
    with running_stub() as stub:
        assert main(["push", str(tmp_path), "--repo", "me/x", "--token", TOKEN, "--endpoint", stub.url]) == 2
        assert "not a run or adapter directory" in capsys.readouterr().err
        (tmp_path / "config.json").write_text("{}")
        with pytest.raises(HubError, match="push to me/x: .*401"):
            push_path(tmp_path, "me/x", token="hf_wrong", endpoint=stub.url)
    assert stub.commits == []
