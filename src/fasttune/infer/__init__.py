"""Using a trained model: `generate` (KV-cache decoding; optionally compiled or CUDA-graphed), `stream`
(text pieces as they are produced), `chat` (multi-turn sessions and the REPL), `evaluate` (held-out loss,
perplexity, answer match), `load` (a run, an adapter or a base model), and the CLI commands over them."""
