"""The audit journal: the group-committing writer, the hash chain's checkpoints, human lines, search."""

from .writer import *  # noqa: F401,F403 - the package's public names
