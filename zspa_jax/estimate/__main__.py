import sys

from zspa_jax.estimate.cli import main

sys.exit(main())
