"""Pigeon scheduler package."""
