"""What a forked child sees, printed as one JSON line (`test_forkserver.py`); then it
sleeps for `argv[1]` seconds and exits with `argv[2]`."""

from __future__ import annotations

import json
import os
import random
import sys
import time

print(
    json.dumps(
        {
            "argv": sys.argv[1:],
            "env": os.environ.get("PROBE"),
            "cwd": os.getcwd(),
            "pid": os.getpid(),
            "sid": os.getsid(0),
            "random": random.random(),
            "stdin": sys.stdin.read(),
        }
    ),
    flush=True,
)
time.sleep(float(sys.argv[1]))
sys.exit(int(sys.argv[2]))
