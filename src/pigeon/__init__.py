"""Pigeon: a mail transfer agent configured like OpenSMTPD."""

__version__ = "0.1.0"
