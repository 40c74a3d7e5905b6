"""Activation memory of our Llama model's training step: which layers recompute, what each keeps and where."""
