"""Job execution: the Celery app and task, the embedded (broker-less) worker, the reaper.

Imports only ``core``. Nothing here touches CUDA at import time: the prefork pool forks children after the
parent imported these modules, and a CUDA context does not survive a fork.
"""
