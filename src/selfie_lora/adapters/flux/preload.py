"""Imported by the training fork server (``forkserver``) before it forks a training child:
what the training loop imports, so that each child starts with it loaded instead of importing
torch, diffusers, peft and transformers itself (tens of seconds, at every training and retry).

Nothing here may stop the fork server: a broken install is left to the child, which imports the
same itself and reports what is wrong.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import importlib
import logging
import os
import re
import signal
import sys
import threading

from selfie_lora.logs import setup_logging

# Module, then the names the loop reads from it (diffusers and transformers import their
# classes on first use).
_NEEDED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("diffusers", ("FluxPipeline", "FluxTransformer2DModel", "AutoencoderKL",
                   "FlowMatchEulerDiscreteScheduler")),
    ("transformers", ("CLIPTextModel", "CLIPTokenizer", "T5EncoderModel", "T5TokenizerFast")),
    ("peft", ("LoraConfig",)),
    ("peft.utils", ("get_peft_model_state_dict",)),
    ("safetensors.torch", ()),
    ("selfie_lora.adapters.flux.train_loop", ()),
    ("selfie_lora.adapters.flux.samples", ()),
)


logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here, not in every child
_SERVER_PID = os.getpid()
# How often the server looks for its service during the preload (``_watch_service``).
_SERVICE_CHECK_S = 0.1
# True in the server only (``_serve``). The hook below is registered in the server's interpreter
# and a fork inherits it: it also ran in every fork a training child made (DataLoader workers, a
# multiprocessing "fork" Process), whose parent is not the server: exit 1 at birth.
_FORKED_BY_SERVER = False


def _in_child() -> None:
    global _FORKED_BY_SERVER
    if not _FORKED_BY_SERVER:
        return  # a training child's own fork: nothing of the server's to undo
    _FORKED_BY_SERVER = False
    # A server killed mid-training (SIGKILL, the OOM killer, a crash) made multiprocessing
    # read its live child as exited (255): the worker never killed it, and a restart put a
    # second child on the same job beside it. The child dies with the server instead, so
    # "server gone" does mean "child gone"; a server already gone before this ran is seen in
    # the parent pid.
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != _SERVER_PID:
        os._exit(1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # numpy's global generator was seeded once, in the server: every child drew the same
    # numbers (Python's own ``random`` is reseeded at fork). Fresh entropy, as a spawned child.
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def _load() -> None:
    # Imports query CUDA (torchao: ``torch.cuda.is_available()`` at import), which without
    # this initialises the CUDA driver here and leaves every fork unable to use CUDA ("Cannot
    # re-initialize CUDA in forked subprocess"): a device ``auto`` child on a GPU host whose
    # device nodes were not seen. Through NVML instead, which a fork does not inherit.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    # What the imports log goes where the child's lines go (JSON lines when so set; settings
    # are read from the environment, which the fork server shares), at the level of a one-shot
    # command: the libraries' import-time notices are the noise setup_logging quietens.
    log_format = os.environ.get("SELFIE_LORA_LOG_FORMAT", "text").strip().lower()
    setup_logging(log_format="json" if log_format == "json" else "text", quiet=True)
    from selfie_lora.adapters.flux.runtime import require_torch

    require_torch()  # torch, then its loggers handed back, then diffusers, peft, transformers
    for name, attributes in _NEEDED:
        module = importlib.import_module(name)
        for attribute in attributes:
            getattr(module, attribute)


def _service_pid() -> int:
    """The pid of the service that started the server, as its preload list names it
    (``forkserver._Server``); the server's parent now for a server started otherwise (a test's
    own ``ForkServer``), which misses a service already gone."""
    found = re.search(re.escape(__name__) + r"\.service_(\d+)",
                      " ".join(getattr(sys, "orig_argv", ())))
    return int(found.group(1)) if found else os.getppid()


def _watch_service(service: int, done: threading.Event) -> None:
    """Exit once the service that started the server is gone (the server's parent is no longer
    ``service``), at once if it is gone already, until the preload is ``done``. Multiprocessing's
    server notices it only in its loop, after the preload: a service killed (SIGKILL, the OOM
    killer) during these tens of seconds of imports, or while the server's interpreter started,
    left its server importing torch on, beside the restarted service's own (6-8 s of CPU on a
    2-core machine), to fork a child for the dead service's start at the end. The parent, not
    the pid: a live service is the server's parent, and a recycled pid is never the parent."""
    while True:
        if os.getppid() != service:
            # One line on the service's stderr (its journal or terminal): why no server is left.
            logger.warning("service %d is gone; the training fork server exits before the end "
                           "of its preload", service)
            os._exit(1)
        if done.wait(_SERVICE_CHECK_S):
            return


def _is_training_server() -> bool:
    """Whether this process is the training fork server: multiprocessing's fork server started
    with this module in its preload. Anywhere else (a REPL, a test importing every module,
    coverage tooling) an import has no effect: it made that process ignore SIGTERM for good."""
    command = " ".join(getattr(sys, "orig_argv", ()))
    return "from multiprocessing.forkserver import main" in command and __name__ in command


def _serve() -> None:
    # A SIGTERM to the service's process group (systemd's stop, ``kill`` of the group) reached the
    # fork server too, and with it gone multiprocessing reads every child it forked as exited (code
    # 255): a worker took its live training child for dead. The server ends by itself once the
    # service and its children are gone; the children it forks get the default back.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Likewise a terminal's Ctrl-C, which reaches the whole foreground group: multiprocessing has
    # the server ignore SIGINT only after its preload, and a Ctrl-C during these tens of seconds of
    # imports killed it (the training then failed as an internal error, where it was handed back).
    # The children get the default back (``forkserver.TrainingProcess``).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _FORKED_BY_SERVER
    _FORKED_BY_SERVER = True
    os.register_at_fork(after_in_child=_in_child)
    # The server ends with its service (multiprocessing's SystemExit): its last garbage
    # collections walked every torch object for ~1.3 s of CPU as the service stopped. Frozen at
    # exit, they skip them (and the finalizers of objects in cycles: close what you open); its
    # children leave through os._exit and never run this. Not under ``python -X dev``, which the
    # server inherits: a developer there wants the last ResourceWarnings and finalizers.
    if not sys.flags.dev_mode:
        atexit.register(gc.freeze)
    # A thread during the imports only: ended before the server forks anything.
    done = threading.Event()
    watcher = threading.Thread(target=_watch_service, args=(_service_pid(), done),
                               name="service-watch", daemon=True)
    watcher.start()
    try:
        with contextlib.suppress(Exception):  # the child meets it again and says what it is
            _load()
    finally:
        done.set()
        watcher.join()


if _is_training_server():
    _serve()
