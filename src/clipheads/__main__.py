"""``python -m clipheads``: the same as the ``clipheads`` command."""

from clipheads.cli import main

main()
