"""``python -m xclip``."""

from xclip.cli.app import main

main()
