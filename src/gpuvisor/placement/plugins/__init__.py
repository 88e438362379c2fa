"""Placement plugins, one per file. ``default_framework`` in ``placement.defaults`` wires them."""
