"""gpuvisor.dispatch."""
