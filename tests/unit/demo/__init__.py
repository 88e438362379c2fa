"""Tests for gpuvisor.demo."""
