"""`python -m gradwire.cli`: the `gradwire` command (the installed one starts at `gradwire_cli`)."""

from gradwire.cli.command import main_entry

main_entry()
