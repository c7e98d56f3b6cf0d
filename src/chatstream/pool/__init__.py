"""Several engines behind one service in one process: conversation-sticky routing with a least-loaded fallback.

``PoolEngine`` implements the engine contract over member engines (one per GPU, say), so the service, its admission
control and both protocols do not change; ``chatstream.pool.policy`` is the routing rule, shared with the Ray router.
See docs/scaling.md.
"""

from chatstream.pool.config import PoolConfig, PoolMember
from chatstream.pool.engine import MemberFailed, PoolEngine
from chatstream.pool.policy import Routing

__all__ = ["MemberFailed", "PoolConfig", "PoolEngine", "PoolMember", "Routing"]
