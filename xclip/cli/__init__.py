"""The command line: commands and console tables."""
