"""``python -m nrc_audit`` → the command-line interface."""

from nrc_audit.cli.app import main

if __name__ == "__main__":
    main()
