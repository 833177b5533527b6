"""Shared test setup. XLA reads XLA_FLAGS once, when its CPU backend starts, so the 8 simulated devices
(for the shard_map tests) must be asked for here, before any test module imports jax."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
