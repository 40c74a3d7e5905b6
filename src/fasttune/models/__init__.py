"""Models: our Llama family (llama.py), any other transformers model (generic.py), and loading."""
