"""Tests for gpuvisor.inventory."""
