"""The error a configuration problem raises at launch. Its own module so that the loader and the value checks
(validate.py) both import it, and neither imports the other for it."""


class ConfigError(ValueError):
    """A configuration problem found at launch; the message names the key."""
