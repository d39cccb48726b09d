"""Published visual-token pruning methods behind `zspa_jax.select_tokens` / `PruneConfig`.

One module per method; `zspa_jax.pruning` is the public front that dispatches to them.
"""
