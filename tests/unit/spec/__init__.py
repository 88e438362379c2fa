"""Tests of gpuvisor.spec."""
