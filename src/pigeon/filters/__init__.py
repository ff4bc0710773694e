"""Pigeon filters package."""
