"""distmerge's command line with every tensor write slowed down (SLOW_WRITE_S seconds), so a
test can SIGKILL a rank in the middle of a merge. Everything else is the real code path."""
import os
import sys
import time

from distmerge import writer
from distmerge.cli import main

DELAY = float(os.environ.get("SLOW_WRITE_S", "0.3"))
_write = writer.SafetensorsWriter.write


def slow_write(self, begin, tensor):
    time.sleep(DELAY)
    return _write(self, begin, tensor)


writer.SafetensorsWriter.write = slow_write
sys.exit(main())
