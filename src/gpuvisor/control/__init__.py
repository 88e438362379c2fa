"""gpuvisor.control."""
