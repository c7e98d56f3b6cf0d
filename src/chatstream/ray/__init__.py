"""ChatStream on Ray Serve: a front deployment (our HTTP app) and N engine replicas with conversation-sticky routing.

Needs the ``ray`` extra (``pip install "chatstream[ray]"``). See docs/scaling.md.
"""

from chatstream.ray.app import FrontSettings, build_app
from chatstream.ray.client import RayEngine
from chatstream.ray.engine_replica import EngineReplica, ReplicaTag
from chatstream.ray.router import ConversationRouter
from chatstream.ray.spec import EngineSpec, ReplicaSettings

__all__ = [
    "ConversationRouter",
    "EngineReplica",
    "EngineSpec",
    "FrontSettings",
    "RayEngine",
    "ReplicaSettings",
    "ReplicaTag",
    "build_app",
]
