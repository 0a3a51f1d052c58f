from nemo_prorl.config.schema import ProRLConfig
from nemo_prorl.config.loader import ConfigError, load_config

__all__ = ["ProRLConfig", "ConfigError", "load_config"]
