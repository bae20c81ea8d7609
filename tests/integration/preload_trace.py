"""A module a test puts in a training fork server's preload after the real one
(test_training_forkserver): importing it writes the file that ``PRELOAD_TRACE`` names, so a
server that went through its whole preload leaves that file behind, whatever the machine's
speed."""

import os
from pathlib import Path

Path(os.environ["PRELOAD_TRACE"]).write_text(str(os.getpid()))
