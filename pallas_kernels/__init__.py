"""Pallas kernels for Ada-KV, each beside a pure-jnp reference."""
