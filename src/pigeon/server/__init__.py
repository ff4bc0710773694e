"""Pigeon server package."""
