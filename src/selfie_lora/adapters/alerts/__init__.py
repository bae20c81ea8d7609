"""Operator alerts (the likeness gate's held versions)."""
