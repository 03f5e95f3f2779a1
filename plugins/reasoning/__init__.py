"""The builtin reasoning parsers (``--reasoning-parser NAME``); the contract is :mod:`patchbay.tools`."""
