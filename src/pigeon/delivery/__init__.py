"""Pigeon delivery package."""
