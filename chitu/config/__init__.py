"""Hydra configuration: serve_config.yaml, models/*.yaml and the typed schema that validates them."""
from chitu.config.loader import CONFIG_DIR, compose_config, hydra_entry
from chitu.config.schema import ChituConfig, ConfigError, validate_config

__all__ = ["CONFIG_DIR", "ChituConfig", "ConfigError", "compose_config", "hydra_entry", "validate_config"]
