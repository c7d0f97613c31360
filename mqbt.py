"""Alias of :mod:`mqbtt`, so that the documentation's examples spelled
``from mqbt import MQbtTLogReceiver`` work as written."""
from mqbtt import *  # noqa: F401,F403
from mqbtt import __all__, __version__  # noqa: F401
