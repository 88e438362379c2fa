"""gpuvisor.telemetry."""
