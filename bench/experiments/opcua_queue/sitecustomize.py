"""Experiment, not product code: put this directory on PYTHONPATH to give the daemon's OPC-UA
source notification and hand-on queues of 100,000 instead of 10,000.

The source resubscribes when more than 10,000 notifications wait (protocols/opcua/source.py,
``NOTIFICATION_QUEUE`` and ``PENDING_READINGS``). With 10,000 monitored items the initial
values alone fill that, and at 25,000 changes/s any pause of 0.4 s does: the source then spends
its time re-creating 10,000 monitored items. S3 runs the daemon with and without this to show
what a queue sized by the number of monitored items would change.
"""

import protocols.opcua.source as _source

_source.NOTIFICATION_QUEUE = 100_000
_source.PENDING_READINGS = 100_000
