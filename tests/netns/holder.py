"""A grant holder for crash tests: opens one grant through the real GrantManager, then waits to be killed.

Run inside the server namespace: python holder.py BACKEND STATE_DIR ADDRESS DURATION [START STOP]
"""

import sys
import time

from spa.grant import CommandAction, Grant
from spa.server.firewall.command import CommandBackend
from spa.server.grants import GrantManager
from spa.server.journal import Journal
from tests.netns.backends import native_backend

backend, state_dir, address, duration = sys.argv[1:5]
commands = CommandAction(start=sys.argv[5], stop=sys.argv[6]) if len(sys.argv) > 6 else None
mgr = GrantManager(Journal(state_dir), native_backend(backend), CommandBackend())
mgr.start()
g = mgr.grant(Grant.create("ssh", address, "22/tcp" if commands is None else (), float(duration), commands))
if commands is not None:
    mgr.command.wait(10)
print("granted", g.deadline, flush=True)
time.sleep(600)
