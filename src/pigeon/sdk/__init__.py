"""Pigeon sdk package."""
