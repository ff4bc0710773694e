"""Pigeon rules package."""
