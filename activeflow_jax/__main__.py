"""`python -m activeflow_jax ...` is the `activeflow` command."""

import sys

from activeflow_jax.cli import main

sys.exit(main())
