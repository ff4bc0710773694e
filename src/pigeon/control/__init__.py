"""Pigeon control package."""
