"""gpuvisor.bench."""
