"""gpuvisor.security."""
