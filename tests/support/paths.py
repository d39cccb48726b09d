"""Where the repository and the tests' on-disk cache are."""

from __future__ import annotations

import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_ROOT = Path(tempfile.gettempdir()) / "zspa_jax_test_cache"
