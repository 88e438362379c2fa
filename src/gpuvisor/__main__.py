"""`python -m gpuvisor` runs the CLI."""

from gpuvisor.cli import main

main()
