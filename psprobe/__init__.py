"""psprobe: collect perfSONAR measurement archives into RabbitMQ.

The version lives here and only here: pyproject.toml, the spec and the
tarball script all read it.
"""

__version__ = "0.1.0"
