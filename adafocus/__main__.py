"""``python -m adafocus``: the ``adafocus`` command, for a checkout that is not pip-installed."""

from adafocus.cli import main

if __name__ == "__main__":
    main()
