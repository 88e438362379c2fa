"""gpuvisor.partition."""
