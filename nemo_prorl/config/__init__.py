from nemo_prorl.config.schema import ProRLConfig
from nemo_prorl.config.errors import ConfigError
from nemo_prorl.config.loader import load_config

__all__ = ["ProRLConfig", "ConfigError", "load_config"]
