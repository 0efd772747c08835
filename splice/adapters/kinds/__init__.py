"""Patch kinds."""
