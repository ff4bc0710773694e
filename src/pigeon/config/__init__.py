"""Pigeon config package."""
