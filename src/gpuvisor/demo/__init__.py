"""gpuvisor.demo."""
