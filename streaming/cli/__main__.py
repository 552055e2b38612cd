"""``python -m streaming.cli``: the ``engine`` command without the console script (e.g. from a child process)."""

from streaming.cli import main

main(prog_name="engine")
