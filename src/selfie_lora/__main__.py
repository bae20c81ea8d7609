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
    finally:
        _spare_the_last_collections()


def _spare_the_last_collections() -> None:
    """Called as the command ends, whatever its exit status. A process that loaded torch (train,
    generate, serve, worker: diffusers, peft and transformers with it) spent ~1.3 s of CPU in
    the interpreter's last garbage collections at exit, walking every one of those objects to
    free them just before the process ends anyway (3 s of a loaded machine's wall time between
    a stopped server's last line and its exit). Frozen, the collector skips them; atexit
    handlers (logging's flush, multiprocessing's clean-up) run as before, and memory goes back
    with the process. Objects in reference cycles are not finalized any more: anything left
    open in a cycle is not closed at exit, so close it explicitly. Not under ``python -X dev``
    (``sys.flags.dev_mode``): a developer there wants the last ResourceWarnings (an unclosed
    file or socket) and finalizers that exit's collections bring."""
    if "torch" in sys.modules and not sys.flags.dev_mode:
        import gc

        gc.freeze()


if __name__ == "__main__":
    main()
