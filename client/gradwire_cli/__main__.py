"""`python -m gradwire_cli`: the `gradwire` command, as installed."""

from gradwire_cli import main

main()
