"""gpuvisor.api."""
