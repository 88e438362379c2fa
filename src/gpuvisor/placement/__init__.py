"""gpuvisor.placement."""
