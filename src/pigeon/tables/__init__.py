"""Pigeon tables package."""
