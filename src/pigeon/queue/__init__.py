"""Pigeon queue package."""
