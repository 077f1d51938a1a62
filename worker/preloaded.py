"""Importing this module preloads the job libraries (:func:`worker.preload.preload`): the name the embedded worker's
fork server is given (``set_forkserver_preload`` takes module names, not calls)."""

from worker.preload import preload

preload()
