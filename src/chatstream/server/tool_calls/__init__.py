"""Tool calling for the OpenAI endpoints: tools in the prompt, calls parsed out of the model's output (whole or
streamed), one pluggable format per model family, and the grammars that force a call for ``tool_choice``.

``base`` holds the values and the streaming parser, ``formats`` the families and their registry, ``rendering`` the
template side and the request plan. Nothing here imports the HTTP layer or the engine.
"""

from chatstream.server.tool_calls.base import (
    ParsedOutput,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStream,
    ToolFormat,
    new_call_id,
)
from chatstream.server.tool_calls.formats import FORMATS, get_format, register_format
from chatstream.server.tool_calls.rendering import (
    TOOLS_IGNORED_HEADER,
    ToolChoice,
    ToolPlan,
    detect_format,
    fold_tool_traffic,
    marker_token_ids,
    plan_tools,
    render_chat,
    supports_tools,
)

__all__ = [
    "FORMATS",
    "TOOLS_IGNORED_HEADER",
    "ParsedOutput",
    "StreamDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallStream",
    "ToolChoice",
    "ToolFormat",
    "ToolPlan",
    "detect_format",
    "fold_tool_traffic",
    "get_format",
    "marker_token_ids",
    "new_call_id",
    "plan_tools",
    "register_format",
    "render_chat",
    "supports_tools",
]
