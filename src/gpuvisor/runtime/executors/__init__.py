"""gpuvisor.runtime.executors."""
