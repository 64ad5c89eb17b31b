"""``python3 -m psprobe``: the same as the psprobe command."""

from psprobe.cli import main

main()
