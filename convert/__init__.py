"""Hugging Face -> zspa_jax checkpoint converters. `python -m convert.llava SRC OUT`."""
