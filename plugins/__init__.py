"""Built-in tokenreduce plugins: one small module per method.

Installed as the ``tokenreduce_plugins`` package and registered through the same entry
points a third-party distribution would use (see ``pyproject.toml``).
"""
