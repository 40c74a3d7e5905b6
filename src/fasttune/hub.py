"""Uploads to the Hugging Face Hub through huggingface_hub: an adapter, a merged model or a GGUF file, each
with its model card as README.md, in one commit to a repository created if it does not exist.

`fasttune push PATH --repo ID` takes what the export commands make:
- a run directory or an adapter directory: the adapter files, with a card written for `ID`;
- a directory with config.json (`fasttune merge`): every file in it, its README.md card included;
- a .gguf file (`fasttune export gguf`): the file, and its card `<name>.README.md` as README.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fasttune.model_card import CARD_FILE, card_text, facts_of
from fasttune.run_dir import holds_adapter, locate


class HubError(RuntimeError):
    """An upload the Hub (or the network) refused; the message says what and where."""


@dataclass(frozen=True)
class Upload:
    """What one push sends: path in the repository -> local file or bytes."""

    files: dict[str, Path | bytes]
    kind: str  # adapter, merged or gguf


def gguf_card_path(gguf: str | Path) -> Path:
    """Where `fasttune export gguf` writes the card of a GGUF file: model.gguf -> model.README.md."""
    gguf = Path(gguf)
    return gguf.with_name(f"{gguf.stem}.{CARD_FILE}")


def _folder(directory: Path) -> dict[str, Path | bytes]:
    return {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*")) if p.is_file()}


def upload_of(path: str | Path, repo_id: str) -> Upload:
    """The files `fasttune push path --repo repo_id` sends (module docstring)."""
    path = Path(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise HubError(f"{path}: no such .gguf file")
        files: dict[str, Path | bytes] = {path.name: path}
        card = gguf_card_path(path)
        if card.is_file():
            files[CARD_FILE] = card
        return Upload(files, "gguf")
    if holds_adapter(path):
        adapter_dir = locate(path).adapter_dir
        files = _folder(adapter_dir)
        files[CARD_FILE] = card_text("adapter", facts_of(path), repo_id).encode()
        return Upload(files, "adapter")
    if (path / "config.json").is_file():
        return Upload(_folder(path), "merged")
    raise HubError(f"{path}: not a run or adapter directory, a merged model directory (config.json) or a "
                   ".gguf file")


def push(upload: Upload, repo_id: str, *, token: str | None = None, private: bool | None = None,
         revision: str | None = None, endpoint: str | None = None,
         commit_message: str | None = None) -> str:
    """Create `repo_id` if needed and commit `upload`'s files to it in one commit; returns the commit URL.

    `endpoint` defaults to huggingface_hub's (HF_ENDPOINT, else https://huggingface.co); `token` to its
    login (HF_TOKEN or `hf auth login`).
    """
    from importlib.metadata import version

    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=token, library_name="fasttune", library_version=version("fasttune"))
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data if isinstance(data, bytes)
                                     else str(data)) for name, data in upload.files.items()]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.create_commit(repo_id, operations, revision=revision,
                                 commit_message=commit_message or f"Upload {upload.kind} with fasttune")
    except HfHubHTTPError as e:
        raise HubError(f"push to {repo_id}: {e}") from e
    except OSError as e:  # no network, a refused connection
        raise HubError(f"push to {repo_id}: {e}") from e
    return info.commit_url


def push_path(path: str | Path, repo_id: str, **kwargs) -> str:
    """`fasttune push`: upload_of(path) pushed to repo_id (see `push` for the keyword arguments)."""
    return push(upload_of(path, repo_id), repo_id, **kwargs)
