"""Old import path of :class:`chatstream.engine.async_engine.TransformersEngine`, kept until every caller imports the
new one."""

from chatstream.engine.async_engine import TransformersEngine

__all__ = ["TransformersEngine"]
