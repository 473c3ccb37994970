"""The model families that can be cut into pipeline stages: one module each, defining an `Architecture`
subclass (whence.shards.architecture), which registers it. Every module of this package is imported here, so
adding a family is adding its module."""

import importlib
import pkgutil

for _family in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_family.name}")
