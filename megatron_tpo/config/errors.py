class ConfigError(ValueError):
    """A setting that cannot work; the message names the setting and why."""
