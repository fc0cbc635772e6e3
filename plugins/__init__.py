"""Built-in ``fp`` plugins (importable as ``fp_plugins``).

Each module is written exactly as a third-party plugin would be: it implements hooks
from :mod:`forensics.plugin.hookspecs` and imports heavy libraries only inside methods.
"""
