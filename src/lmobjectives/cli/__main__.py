"""``python -m lmobjectives.cli``."""

from lmobjectives.cli import main

main()
