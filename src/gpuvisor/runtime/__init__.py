"""gpuvisor.runtime."""
