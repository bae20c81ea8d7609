"""The ``selfie-lora`` command (``python -m selfie_lora`` too). This module imports nothing but
the standard library's ``sys`` before the command line: loading that (typer, rich, pydantic,
httpx) takes most of a second, and a Ctrl-C meanwhile printed a traceback into importlib and
the process died of the SIGINT, where a Ctrl-C in a command is a short line and exit status 130.
It is the script's entry point (``pyproject.toml``) so that its ``try`` is in place first."""

import sys


def main() -> None:
    try:
        from selfie_lora.cli import main as run

        run()
    except KeyboardInterrupt:
        # Once the command runs, typer turns a Ctrl-C into exit status 130 itself: what reaches
        # here came while the modules loaded, before anything was read or written.
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C: the same line, once
        sys.stderr.write("interrupted before the command started: nothing was done\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
