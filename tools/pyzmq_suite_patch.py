"""pytest plugin: pyzmq's own tests run under ``zmqfork.patch()``.

Loaded with ``-p pyzmq_suite_patch`` (tools/ on PYTHONPATH) by
tools/pyzmq_suite.py, so ``patch()`` runs before pyzmq's conftest.py and
test modules are imported and before any of their contexts is made.
"""

import zmqfork

zmqfork.patch()
