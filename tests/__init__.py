"""The test suite (a regular package, so `tests.*` imports resolve here even when an
installed distribution ships a top-level `tests` package, as latex2sympy2 does)."""
