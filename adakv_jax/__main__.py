import sys

from adakv_jax.cli import main

sys.exit(main())
