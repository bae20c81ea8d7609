"""A training fork server's preload that lasts minutes (test_training_forkserver): the server
is signalled while it runs, as a Ctrl-C or the OOM killer may reach the real one during its
tens of seconds of imports."""

import time

time.sleep(300)
