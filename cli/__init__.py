"""The ``ehrmamba`` command line: the one entry point to every part of the project."""
