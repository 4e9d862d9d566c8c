"""The ``tether`` command line: serve, demo, and the operator's and reviewer's tools."""

from .main import *  # noqa: F401,F403 - the package's public names
