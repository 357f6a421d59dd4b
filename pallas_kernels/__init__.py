"""pallas_kernels: Pallas kernels for paged attention, each beside its pure-jnp reference."""
