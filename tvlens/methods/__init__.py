"""Method configs and their registry (see :mod:`tvlens.methods.base`)."""

from tvlens.methods.base import (REGISTRY, MethodConfig, add_config_flags, config_from_args,
                                 get_config, methods, register)
from tvlens.methods.configs import (DEFAULT_TEMPLATES, ATVConfig, FVConfig, ICLTVConfig,
                                    LTVConfig, VanillaConfig)

__all__ = ["ATVConfig", "DEFAULT_TEMPLATES", "FVConfig", "ICLTVConfig", "LTVConfig",
           "MethodConfig", "REGISTRY", "VanillaConfig", "add_config_flags", "config_from_args",
           "get_config", "methods", "register"]
