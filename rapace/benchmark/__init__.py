"""The cross-process benchmark behind ``python -m rapace bench``.

``driver`` starts, for each transport and build, a server process and a client process
(``python -m rapace bench-server`` / ``bench-client``) and prints one table. ``floor`` is a
raw length-prefixed ``asyncio.Protocol`` echo, the speed rapace is judged against; ``rpc``
is the same workload over rapace sessions; ``workload`` holds what both share.
"""

from __future__ import annotations
