"""Configuration: its schema (model.py), the fold of CONFIG events into it (state.py)."""
from shared.config.model import CaduceusConfig, ConfigError, Module, Rule, SettingsItem, Target

__all__ = ["CaduceusConfig", "ConfigError", "Module", "Rule", "SettingsItem", "Target"]
