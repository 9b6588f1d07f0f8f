"""The models: a dense Llama-style decoder (transformer.py)."""
