"""spa-gatekeeper: keep every port closed; open one, for one address, for a while.

The ``spa`` package is the pure core (formats, policy, models). Its
subpackages ``spa.server``, ``spa.client`` and ``spa.keys`` hold the I/O
edges; they live in ``server/``, ``client/`` and ``keys/`` in the source tree.
"""

__version__ = "0.1.0"
