"""smtpd.conf: parsing (lark grammar), the configuration model, and validation.

    config = load_config("/etc/pigeon/smtpd.conf", {"name": "value"})

raises ConfigError whose ``issues`` are ``file:line:col: message`` entries.
"""

from pigeon.config.issues import ConfigError, ConfigIssue
from pigeon.config.model import Config
from pigeon.config.parser import load_config, parse_config_text

__all__ = ["Config", "ConfigError", "ConfigIssue", "load_config", "parse_config_text"]
