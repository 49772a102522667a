"""Experiment, not product code: put this directory on PYTHONPATH to have the daemon call
``gc.freeze()`` 2.5 s after the interpreter starts (after start-up, when the configuration,
compiled mappings and imported modules exist).

Frozen objects are left out of every later collection, so the periodic full (generation 2)
collection no longer walks the hundreds of thousands of long-lived objects and no longer
stalls the event loop. S4 runs the daemon with and without it to show what one
``gc.freeze()`` at the end of start-up in the daemon would change.
"""

import gc
import threading

_timer = threading.Timer(2.5, gc.freeze)
_timer.daemon = True
_timer.start()
