"""``python -m lowbit`` runs the command-line interface (the same as the ``lowbit`` script)."""

from lowbit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
