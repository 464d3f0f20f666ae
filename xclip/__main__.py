"""``python -m xclip``."""

from xclip.cli import main

main()
