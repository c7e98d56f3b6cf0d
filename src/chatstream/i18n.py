"""The small message catalogue for text that users and operators read (English and Japanese).

Log lines for developers stay in English; the messages here are the few that reach a person running or using the
service (startup warnings, drain notices, user-facing errors). ``locale`` "ja" or "ja-JP" selects Japanese; any
other value (or None) selects English.
"""

from __future__ import annotations

from typing import Final

SUPPORTED_LOCALES: Final = ("en", "ja")

_CATALOGUE: Final[dict[str, dict[str, str]]] = {
    "session_secret_generated": {
        "en": "No session secret_key was given; using a random per-process secret. Sessions will not survive a "
        "restart and will not be shared between processes. Pass a secret_key in production.",
        "ja": "セッションの secret_key が指定されていないため、プロセスごとのランダムな秘密鍵を使います。"
        "再起動するとセッションは失われ、プロセス間でも共有されません。本番環境では secret_key を指定してください。",
    },
    "cors_all_origins": {
        "en": "CORS allows every origin (develop mode). Do not use this setting in production.",
        "ja": "CORS がすべてのオリジンを許可しています（開発モード）。本番環境ではこの設定を使わないでください。",
    },
    "cors_enabled": {
        "en": "CORS enabled for origins %s.",
        "ja": "CORS を有効にしました（許可オリジン: %s）。",
    },
    "drain_started": {
        "en": "Shutting down: no new requests are admitted; waiting up to %.1f s for %d running generation(s).",
        "ja": "シャットダウン中: 新しいリクエストは受け付けません。実行中の生成の完了を最大 %.1f 秒待ちます（%d 件）。",
    },
    "drain_finished": {
        "en": "Shutdown complete.",
        "ja": "シャットダウンが完了しました。",
    },
    "no_apis_selected": {
        "en": "append_apis was called without 'include', 'exclude' or 'all'; no API was added.",
        "ja": "append_apis に 'include'、'exclude'、'all' のいずれも指定されていないため、API は追加されませんでした。",
    },
    "web_ui_missing": {
        "en": "The ChatStream web UI is not installed in this build.",
        "ja": "このビルドには ChatStream の Web UI が含まれていません。",
    },
}


def normalize_locale(locale: str | None) -> str:
    """ "ja", "ja-JP", "ja_JP.UTF-8" → "ja"; anything else (including None) → "en"."""
    if not locale:
        return "en"
    language = locale.strip().lower().replace("_", "-").split("-")[0].split(".")[0]
    return "ja" if language == "ja" else "en"


def message(key: str, locale: str | None = None) -> str:
    """The catalogue text for ``key`` in ``locale`` (a %-style template when the entry takes arguments).

    Raises KeyError for an unknown key, so that a typo fails in the tests instead of printing nothing.
    """
    entry = _CATALOGUE[key]
    return entry[normalize_locale(locale)]
