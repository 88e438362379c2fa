"""gpuvisor.placement.plugins."""
