/* ChatStream web chat page: plain JavaScript, no build step, no external resources. */
(function () {
  "use strict";

  const EOS = "<::EOS::>";
  const DEVTOOL_KEY = "chatstream.devtool";
  const LOAD_POLL_MS = 1000;
  const PROMOTION_RE = /^New role: '.*' has been granted\s*$/;

  // ---------------------------------------------------------------- labels
  const LABELS = {
    en: {
      skip: "Skip to message input", clear: "Clear conversation", developer: "Developer",
      developerPanel: "Developer panel", close: "Close", send: "Send", inputLabel: "Message",
      placeholder: "Send a message…", hint: "Enter to send, Shift+Enter for a new line",
      stop: "Stop generating", regenerate: "Regenerate", like: "Good answer", dislike: "Bad answer",
      copy: "Copy", copied: "Copied to clipboard", retry: "Retry", stopped: "Stopped",
      you: "You said:", assistant: "Assistant said:", generating: "Generating an answer…",
      busy: "The server is busy right now. Please try again in a moment.",
      busyAfter: "The server is busy right now. Please try again in {s} seconds.",
      network: "Could not reach the server. Check your connection and try again.",
      interrupted: "The connection was lost before the answer was complete.",
      server: "The server ran into an error (HTTP {status}). Please try again.",
      badRequest: "The server rejected the request: {detail}",
      forbidden: "This action is not allowed for your session (403).",
      cleared: "Conversation cleared", clearFailed: "Could not clear the conversation.",
      thanks: "Thanks for your feedback", feedbackFailed: "Could not send feedback.",
      devEnabled: "Developer tools enabled", hiddenPhrase: "(pass phrase hidden)",
      load: "Server load", running: "Running", waiting: "Waiting", generationParams: "Generation parameters",
      apply: "Apply", reload: "Reload", saved: "Saved", prompt: "Current prompt", refresh: "Refresh",
      noPrompt: "(no prompt yet)", requestFailed: "Request failed ({status}).", empty: "(empty answer)",
      conversations: "Conversations", newChat: "New chat", untitled: "New conversation", rename: "Rename",
      exportMarkdown: "Export as Markdown", exportJson: "Export as JSON", delete: "Delete", cancel: "Cancel",
      moreActions: "More actions for “{title}”", titleLabel: "Conversation title",
      confirmDelete: "Delete “{title}”? This cannot be undone.", deleted: "Conversation deleted",
      loadFailed: "Could not load the conversation.", renameFailed: "Could not rename the conversation.",
      deleteFailed: "Could not delete the conversation.",
    },
    ja: {
      skip: "入力欄へ移動", clear: "会話をクリア", developer: "開発者",
      developerPanel: "開発者パネル", close: "閉じる", send: "送信", inputLabel: "メッセージ",
      placeholder: "メッセージを入力…", hint: "Enter で送信、Shift+Enter で改行",
      stop: "生成を停止", regenerate: "再生成", like: "良い回答", dislike: "良くない回答",
      copy: "コピー", copied: "クリップボードにコピーしました", retry: "再試行", stopped: "停止しました",
      you: "あなた:", assistant: "アシスタント:", generating: "回答を生成しています…",
      busy: "サーバーが混み合っています。しばらくしてから再試行してください。",
      busyAfter: "サーバーが混み合っています。{s} 秒後に再試行してください。",
      network: "サーバーに接続できませんでした。接続を確認して再試行してください。",
      interrupted: "回答の途中で接続が切れました。",
      server: "サーバーでエラーが発生しました (HTTP {status})。再試行してください。",
      badRequest: "サーバーがリクエストを拒否しました: {detail}",
      forbidden: "このセッションでは許可されていない操作です (403)。",
      cleared: "会話をクリアしました", clearFailed: "会話をクリアできませんでした。",
      thanks: "フィードバックありがとうございます", feedbackFailed: "フィードバックを送信できませんでした。",
      devEnabled: "開発者ツールが有効になりました", hiddenPhrase: "(パスフレーズは非表示)",
      load: "サーバー負荷", running: "実行中", waiting: "待機中", generationParams: "生成パラメータ",
      apply: "適用", reload: "再読込", saved: "保存しました", prompt: "現在のプロンプト", refresh: "更新",
      noPrompt: "(プロンプトはまだありません)", requestFailed: "リクエストに失敗しました ({status})。",
      empty: "(空の回答)",
      conversations: "会話", newChat: "新しいチャット", untitled: "新しい会話", rename: "名前を変更",
      exportMarkdown: "Markdown でエクスポート", exportJson: "JSON でエクスポート", delete: "削除", cancel: "キャンセル",
      moreActions: "「{title}」の操作", titleLabel: "会話のタイトル",
      confirmDelete: "「{title}」を削除しますか?元に戻せません。", deleted: "会話を削除しました",
      loadFailed: "会話を読み込めませんでした。", renameFailed: "会話の名前を変更できませんでした。",
      deleteFailed: "会話を削除できませんでした。",
    },
  };

  function pickLanguage() {
    const langs = navigator.languages && navigator.languages.length ? navigator.languages : [navigator.language || "en"];
    return String(langs[0] || "en").toLowerCase().startsWith("ja") ? "ja" : "en";
  }

  function format(template, values) {
    return template.replace(/\{(\w+)\}/g, (m, key) => (key in values ? String(values[key]) : m));
  }

  // ---------------------------------------------------------------- options
  function readParams() {
    const el = document.getElementById("chatstream-params");
    try {
      const value = JSON.parse(el ? el.textContent : "");
      return value && typeof value === "object" && !Array.isArray(value) ? value : {};
    } catch (err) {
      return {}; // placeholder not replaced (page opened without the server): use the defaults
    }
  }

  function optionText(value, fallback) {
    return typeof value === "string" && value.trim() ? value : fallback;
  }

  function buildSettings(params) {
    const style = params.style_opts && typeof params.style_opts === "object" ? params.style_opts : {};
    const lang = pickLanguage();
    const t = LABELS[lang];
    return {
      lang: lang,
      t: t,
      welcomeMessage: typeof params.welcomeMessage === "string" ? params.welcomeMessage : "",
      clearContextOnReload: params.clearContextOnReload === true,
      developMode: params.developMode === true,
      showAiIcon: style.show_ai_icon !== false,
      showHumanIcon: style.show_human_icon === true,
      aiIconUrl: typeof style.ai_icon_url === "string" ? style.ai_icon_url : "",
      humanIconUrl: typeof style.human_icon_url === "string" ? style.human_icon_url : "",
      regenerateEnabled: style.regenerate_enabled !== false,
      stopLabel: optionText(style.button_label_stop_generating, t.stop),
      regenerateLabel: optionText(style.button_label_regenerate, t.regenerate),
      placeholder: optionText(style.label_input_placeholder, t.placeholder),
    };
  }

  // ---------------------------------------------------------------- safe Markdown
  // Model text is HTML-escaped FIRST; the renderer then only adds tags of its own around escaped text.
  function escapeHtml(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  function renderEmphasis(s) {
    return s
      .replace(/\*\*(?=\S)([^\n]*?\S)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^\w])__(?=\S)([^\n]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
      .replace(/\*(?=[^\s*])([^*\n]*?[^\s*])\*/g, "<em>$1</em>")
      .replace(/\*([^\s*])\*/g, "<em>$1</em>")
      .replace(/(^|[^\w])_(?=[^\s_])([^_\n]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>")
      .replace(/~~(?=\S)([^\n]*?\S)~~/g, "<del>$1</del>");
  }

  /** Inline Markdown on one line of ALREADY ESCAPED text. */
  function renderInline(escaped) {
    const slots = [];
    const keep = (html) => "\u0000" + (slots.push(html) - 1) + "\u0000";
    let s = escaped.replace(/`([^`]+)`/g, (m, code) => keep("<code>" + code + "</code>"));
    s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s()]+)\)/gi, (m, label, url) =>
      keep('<a href="' + url + '" target="_blank" rel="noopener noreferrer">' + renderEmphasis(label) + "</a>"));
    s = renderEmphasis(s);
    return s.replace(/\u0000(\d+)\u0000/g, (m, i) => slots[Number(i)]);
  }

  function inline(raw) {
    return renderInline(escapeHtml(raw));
  }

  function codeBlock(code, lang) {
    const attr = lang ? ' data-lang="' + escapeHtml(lang) + '"' : "";
    return "<pre" + attr + "><code>" + escapeHtml(code) + "</code></pre>";
  }

  const FENCE_RE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)[^`]*$/;
  const HR_RE = /^ {0,3}([-*_])( *\1){2,} *$/;
  const HEADING_RE = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const QUOTE_RE = /^ {0,3}> ?(.*)$/;
  const UL_RE = /^\s*[-*+]\s+(.*)$/;
  const OL_RE = /^\s*(\d{1,9})[.)]\s+(.*)$/;

  /** Render Markdown to HTML; every piece of model text passes through escapeHtml. */
  function renderMarkdown(text) {
    const lines = text.replace(/\u0000/g, "").replace(/\r\n?/g, "\n").split("\n");
    const out = [];
    let para = [];
    let list = null;
    const flushPara = () => {
      if (para.length) out.push("<p>" + para.map(inline).join("<br>") + "</p>");
      para = [];
    };
    const flushList = () => {
      if (!list) return;
      const start = list.type === "ol" && list.start !== 1 ? ' start="' + list.start + '"' : "";
      const items = list.items.map((item) => "<li>" + item.map(inline).join("<br>") + "</li>").join("");
      out.push("<" + list.type + start + ">" + items + "</" + list.type + ">");
      list = null;
    };
    const flush = () => { flushPara(); flushList(); };
    const addItem = (type, body, start) => {
      flushPara();
      if (!list || list.type !== type) { flushList(); list = { type: type, start: start, items: [] }; }
      list.items.push([body]);
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      let m = FENCE_RE.exec(line);
      if (m) {
        flush();
        const marker = m[1];
        const code = [];
        for (i++; i < lines.length; i++) {
          const close = lines[i].trim();
          if (close.length >= marker.length && close === marker[0].repeat(close.length)) break;
          code.push(lines[i]);
        }
        out.push(codeBlock(code.join("\n"), m[2]));
      } else if (!line.trim()) {
        flush();
      } else if (HR_RE.test(line)) {
        flush();
        out.push("<hr>");
      } else if ((m = HEADING_RE.exec(line))) {
        flush();
        const level = Math.min(m[1].length + 2, 6);
        out.push("<h" + level + ">" + inline(m[2]) + "</h" + level + ">");
      } else if (QUOTE_RE.test(line)) {
        flush();
        const quoted = [];
        for (; i < lines.length && (m = QUOTE_RE.exec(lines[i])); i++) quoted.push(m[1]);
        i--;
        out.push("<blockquote>" + renderMarkdown(quoted.join("\n")) + "</blockquote>");
      } else if ((m = UL_RE.exec(line))) {
        addItem("ul", m[1], 1);
      } else if ((m = OL_RE.exec(line))) {
        addItem("ol", m[2], Number(m[1]));
      } else if (list && /^\s{2,}\S/.test(line)) {
        list.items[list.items.length - 1].push(line.trim());
      } else {
        flushList();
        para.push(line);
      }
    }
    flush();
    return out.join("");
  }

  // ---------------------------------------------------------------- transport
  function apiUrl(path) {
    return new URL(path, document.baseURI).toString(); // relative, so the page also works under a path prefix
  }

  function isAbort(err) {
    return err && err.name === "AbortError";
  }

  async function requestJson(method, path, body, headers) {
    const init = { method: method, credentials: "same-origin", headers: Object.assign({ Accept: "application/json" }, headers) };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    try {
      const response = await fetch(apiUrl(path), init);
      let data = null;
      try { data = await response.json(); } catch (err) { data = null; }
      return { ok: response.ok, status: response.status, data: data };
    } catch (err) {
      return { ok: false, status: 0, data: null };
    }
  }

  /** Classify a response that is not a text stream: too many requests, a JSON error, or an HTTP error. */
  async function classifyFailure(response, extra) {
    let data = null;
    try { data = await response.json(); } catch (err) { data = null; }
    const error = data && typeof data === "object" ? data.error : undefined;
    if (response.status === 429 || error === "too_many_requests") {
      const after = parseInt(response.headers.get("Retry-After") || "", 10);
      return Object.assign(extra, { kind: "busy", retryAfter: Number.isFinite(after) && after > 0 ? after : 0 });
    }
    if (response.status === 403) return Object.assign(extra, { kind: "forbidden" });
    if (response.status >= 400 && response.status < 500) {
      const detail = data && (data.detail || data.message || data.error);
      return Object.assign(extra, { kind: "bad_request", status: response.status, detail: detail ? String(detail) : "" });
    }
    return Object.assign(extra, { kind: "server", status: response.status });
  }

  /**
   * POST /chat_stream and follow the native stream: each segment is the cumulative answer followed by <::EOS::>;
   * network chunks may split or merge segments, so only the last COMPLETE segment is shown.
   */
  async function streamChat(body, signal, onText, headers) {
    let response;
    try {
      response = await fetch(apiUrl("chat_stream"), {
        method: "POST", credentials: "same-origin", signal: signal,
        headers: Object.assign({ "Content-Type": "application/json" }, headers), body: JSON.stringify(body),
      });
    } catch (err) {
      return { kind: isAbort(err) ? "aborted" : "network", text: "" };
    }
    const extra = {
      text: "",
      messageId: response.headers.get("X-ChatStream-Last-Generated-Message-Id") || "",
      devTool: (response.headers.get("X-ChatStream-API-DevTool-Enabled") || "").toLowerCase() === "enabled",
      conversationId: response.headers.get("X-ChatStream-Conversation-Id") || "",
    };
    const type = (response.headers.get("Content-Type") || "").toLowerCase();
    if (!response.ok || type.includes("application/json") || !response.body) return classifyFailure(response, extra);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let pending = "";
    let sawSegment = false;
    try {
      for (;;) {
        const chunk = await reader.read();
        if (chunk.done) break;
        pending += decoder.decode(chunk.value, { stream: true });
        const parts = pending.split(EOS);
        if (parts.length > 1) {
          extra.text = parts[parts.length - 2];
          pending = parts[parts.length - 1];
          sawSegment = true;
          onText(extra.text);
        }
      }
    } catch (err) {
      return Object.assign(extra, { kind: isAbort(err) || signal.aborted ? "aborted" : "interrupted" });
    }
    pending += decoder.decode();
    if (!sawSegment && pending) extra.text = pending; // a plain-text reply without the marker
    return Object.assign(extra, { kind: "done" });
  }

  // ---------------------------------------------------------------- small DOM helpers
  const SVG_NS = "http://www.w3.org/2000/svg";
  const ICONS = {
    ai: '<path d="M12 3l1.9 5.1L19 10l-5.1 1.9L12 17l-1.9-5.1L5 10l5.1-1.9z"/><path d="M19 15l.8 2.2L22 18l-2.2.8L19 21l-.8-2.2L16 18l2.2-.8z"/>',
    human: '<circle cx="12" cy="8" r="4"/><path d="M4 21c0-4.4 3.6-7 8-7s8 2.6 8 7"/>',
    like: '<path d="M7 10v11H3V10z"/><path d="M7 10l4-8c1.7 0 3 1.3 3 3v4h5.5c1.2 0 2.1 1.1 1.9 2.3l-1.4 8c-.2 1-1 1.7-2 1.7H7"/>',
    dislike: '<path d="M17 14V3h4v11z"/><path d="M17 14l-4 8c-1.7 0-3-1.3-3-3v-4H4.5c-1.2 0-2.1-1.1-1.9-2.3l1.4-8C4.2 3.7 5 3 6 3h11"/>',
    copy: '<rect x="9" y="9" width="12" height="12" rx="2"/><path d="M5 15H4a1 1 0 0 1-1-1V4a1 1 0 0 1 1-1h10a1 1 0 0 1 1 1v1"/>',
    regenerate: '<path d="M21 12a9 9 0 1 1-3-6.7L21 8"/><path d="M21 3v5h-5"/>',
    retry: '<path d="M21 12a9 9 0 1 1-3-6.7L21 8"/><path d="M21 3v5h-5"/>',
    more: '<circle cx="5" cy="12" r="1.2"/><circle cx="12" cy="12" r="1.2"/><circle cx="19" cy="12" r="1.2"/>',
  };

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function icon(name) {
    const svg = document.createElementNS(SVG_NS, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("fill", "none");
    svg.setAttribute("stroke", "currentColor");
    svg.setAttribute("stroke-width", "2");
    svg.setAttribute("stroke-linecap", "round");
    svg.setAttribute("stroke-linejoin", "round");
    svg.setAttribute("aria-hidden", "true");
    svg.innerHTML = ICONS[name]; // constant markup from this file, never model text
    return svg;
  }

  function iconButton(name, label, onClick, showText) {
    const button = el("button", "cs-icon-btn");
    button.type = "button";
    button.dataset.action = name;
    button.appendChild(icon(name));
    if (showText) button.appendChild(el("span", "", label));
    else { button.setAttribute("aria-label", label); button.title = label; }
    button.addEventListener("click", onClick);
    return button;
  }

  // ---------------------------------------------------------------- messages
  function avatar(kind, url) {
    const box = el("div", "cs-avatar");
    box.setAttribute("aria-hidden", "true");
    if (url) {
      const img = el("img");
      img.alt = "";
      img.src = url;
      box.appendChild(img);
    } else {
      box.appendChild(icon(kind));
    }
    return box;
  }

  /** One message row in the log; assistant rows render Markdown, user rows plain text. */
  class MessageView {
    constructor(role, settings) {
      const isUser = role === "user";
      this.role = role;
      this.text = "";
      this.messageId = "";
      this.feedback = null;
      this.root = el("div", "cs-msg " + (isUser ? "cs-msg-user" : "cs-msg-ai"));
      this.root.dataset.role = role;
      const showIcon = isUser ? settings.showHumanIcon : settings.showAiIcon;
      if (showIcon) this.root.appendChild(avatar(isUser ? "human" : "ai", isUser ? settings.humanIconUrl : settings.aiIconUrl));
      this.body = el("div", "cs-body");
      this.body.appendChild(el("span", "cs-visually-hidden", isUser ? settings.t.you : settings.t.assistant));
      this.bubble = el("div", "cs-bubble");
      this.note = el("div", "cs-status-note");
      this.note.hidden = true;
      this.actions = el("div", "cs-actions");
      this.actions.hidden = true;
      this.body.append(this.bubble, this.note, this.actions);
      this.root.appendChild(this.body);
    }

    setPlain(text) {
      this.text = text;
      this.bubble.textContent = text;
    }

    setMarkdown(text) {
      this.text = text;
      this.bubble.innerHTML = renderMarkdown(text); // renderMarkdown escapes all model text first
    }

    setThinking() {
      this.text = "";
      this.bubble.textContent = "";
      const dots = el("div", "cs-thinking");
      dots.append(el("span"), el("span"), el("span"));
      this.bubble.appendChild(dots);
      this.setNote("");
      this.actions.hidden = true;
      this.actions.textContent = "";
    }

    setNote(text) {
      this.note.textContent = text;
      this.note.hidden = !text;
    }

    setState(state) {
      this.root.dataset.state = state; // streaming, done, stopped, interrupted, busy, error, promotion
    }

    setStreaming(on) {
      this.root.classList.toggle("cs-streaming", on);
    }

    showAlert(kind, message, retryLabel, onRetry) {
      this.setState(kind);
      this.text = "";
      this.bubble.textContent = "";
      const box = el("div", "cs-alert cs-alert-" + kind);
      box.setAttribute("role", "alert");
      box.dataset.kind = kind;
      box.appendChild(el("span", "cs-alert-text", message));
      if (onRetry) {
        const retry = el("button", "cs-btn cs-retry");
        retry.type = "button";
        retry.append(icon("retry"), el("span", "", retryLabel));
        retry.addEventListener("click", onRetry);
        box.appendChild(retry);
      }
      this.bubble.appendChild(box);
    }
  }

  // ---------------------------------------------------------------- developer panel
  class DevPanel {
    constructor(app) {
      this.app = app;
      this.t = app.settings.t;
      this.panel = document.getElementById("cs-dev");
      this.toggle = document.getElementById("cs-dev-toggle");
      this.loadBox = document.getElementById("cs-load");
      this.loadMsg = document.getElementById("cs-load-msg");
      this.paramsForm = document.getElementById("cs-params-form");
      this.paramsMsg = document.getElementById("cs-params-msg");
      this.promptBox = document.getElementById("cs-prompt");
      this.timer = 0;
      this.toggle.addEventListener("click", () => (this.isOpen() ? this.close() : this.open()));
      document.getElementById("cs-dev-close").addEventListener("click", () => this.close());
      document.getElementById("cs-params-reload").addEventListener("click", () => this.loadParams());
      document.getElementById("cs-prompt-reload").addEventListener("click", () => this.loadPrompt());
      this.paramsForm.addEventListener("submit", (event) => { event.preventDefault(); this.saveParams(); });
      this.panel.addEventListener("keydown", (event) => {
        if (event.key === "Escape") { event.preventDefault(); this.close(); }
      });
    }

    enable() {
      this.toggle.hidden = false;
    }

    isOpen() {
      return !this.panel.hidden;
    }

    open() {
      this.panel.hidden = false;
      this.toggle.setAttribute("aria-expanded", "true");
      document.getElementById("cs-dev-title").setAttribute("tabindex", "-1");
      document.getElementById("cs-dev-title").focus();
      this.pollLoad();
      this.loadParams();
      this.loadPrompt();
    }

    close() {
      this.panel.hidden = true;
      this.toggle.setAttribute("aria-expanded", "false");
      clearTimeout(this.timer);
      this.timer = 0;
      this.toggle.focus();
    }

    failure(result) {
      if (result.status === 403) return this.t.forbidden;
      const message = result.data && result.data.message;
      return message ? String(message) : format(this.t.requestFailed, { status: result.status || "network" });
    }

    async pollLoad() {
      clearTimeout(this.timer);
      const result = await requestJson("GET", "get_load");
      if (!this.isOpen()) return;
      const workers = result.ok && result.data && Array.isArray(result.data.chatstream_workers) ? result.data.chatstream_workers : null;
      if (workers) this.renderLoad(workers);
      this.loadMsg.textContent = workers ? "" : this.failure(result);
      this.loadMsg.classList.toggle("cs-bad", !workers);
      this.timer = setTimeout(() => this.pollLoad(), LOAD_POLL_MS);
    }

    renderLoad(workers) {
      this.loadBox.textContent = "";
      for (const worker of workers) {
        if (workers.length > 1) this.loadBox.appendChild(el("div", "cs-load-name", String(worker.name || "")));
        this.loadBox.appendChild(this.meter(this.t.running, worker.processing, worker.max_processing, "running"));
        this.loadBox.appendChild(this.meter(this.t.waiting, worker.waiting, worker.max_waiting, "waiting"));
      }
    }

    meter(label, value, max, key) {
      const row = el("div", "cs-load-row");
      row.dataset.load = key;
      const now = Number(value) || 0;
      const limit = Number(max) || 0;
      const bar = el("div", "cs-meter");
      bar.setAttribute("role", "meter");
      bar.setAttribute("aria-label", label);
      bar.setAttribute("aria-valuemin", "0");
      bar.setAttribute("aria-valuemax", String(limit));
      bar.setAttribute("aria-valuenow", String(now));
      const fill = el("div");
      fill.style.width = limit > 0 ? Math.min(100, (100 * now) / limit) + "%" : now > 0 ? "100%" : "0";
      bar.appendChild(fill);
      row.append(el("span", "", label), bar, el("span", "cs-load-value", now + " / " + limit));
      return row;
    }

    fillParams(params) {
      const inputs = this.paramsForm.elements;
      for (const name of ["temperature", "top_k_value", "top_p_value"]) {
        const value = params[name];
        inputs.namedItem(name).value = value === null || value === undefined ? "" : String(value);
      }
    }

    showParamsMessage(text, bad) {
      this.paramsMsg.textContent = text;
      this.paramsMsg.classList.toggle("cs-bad", bad);
    }

    async loadParams() {
      const result = await requestJson("GET", "get_generation_params");
      const params = result.ok && result.data && result.data.success ? result.data.generation_params : null;
      if (params) this.fillParams(params);
      this.showParamsMessage(params ? "" : this.failure(result), !params);
    }

    async saveParams() {
      const body = {};
      const inputs = this.paramsForm.elements;
      for (const name of ["temperature", "top_k_value", "top_p_value"]) {
        const raw = inputs.namedItem(name).value.trim();
        if (raw !== "") body[name] = name === "top_k_value" ? parseInt(raw, 10) : parseFloat(raw);
      }
      const result = await requestJson("POST", "set_generation_params", body);
      const ok = result.ok && result.data && result.data.success;
      if (ok && result.data.generation_params) this.fillParams(result.data.generation_params);
      this.showParamsMessage(ok ? this.t.saved : this.failure(result), !ok);
    }

    async loadPrompt() {
      const result = await requestJson("GET", "get_prompt");
      if (!(result.ok && result.data && result.data.success)) {
        this.promptBox.textContent = this.failure(result);
        return;
      }
      const encoded = result.data.prompt;
      let text = this.t.noPrompt;
      if (typeof encoded === "string") {
        try { text = decodeURIComponent(encoded); } catch (err) { text = encoded; }
      }
      this.promptBox.textContent = text;
    }

    refreshAfterTurn() {
      if (this.isOpen()) this.loadPrompt();
    }
  }

  // ---------------------------------------------------------------- conversations sidebar
  function conversationPath(id, rest) {
    return "conversations/" + encodeURIComponent(id) + (rest || "");
  }

  /** The user's conversations, newest first: new chat, switch, rename, delete (confirmed), export. */
  class ConversationSidebar {
    constructor(app) {
      this.app = app;
      this.t = app.t;
      this.nav = document.getElementById("cs-side");
      this.list = document.getElementById("cs-conv-list");
      this.msg = document.getElementById("cs-side-msg");
      this.toggle = document.getElementById("cs-side-toggle");
      this.scrim = document.getElementById("cs-scrim");
      this.dialog = document.getElementById("cs-confirm");
      this.available = false;
      this.menu = null;
    }

    /** Show the sidebar when the server offers the conversations API to this user, and the current conversation. */
    async start() {
      await this.app.ready;
      const result = await requestJson("GET", "conversations?limit=100");
      if (!(result.ok && result.data && Array.isArray(result.data.data))) return; // not allowed or not mounted
      this.available = true;
      this.bind();
      this.nav.hidden = false;
      this.toggle.hidden = false;
      const current = result.data.current_id;
      const stored = result.data.data.some((conv) => conv.id === current);
      this.render(result.data.data);
      if (stored && !this.app.log.querySelector(".cs-msg-user")) await this.app.openConversation(current, false);
    }

    bind() {
      this.toggle.addEventListener("click", () => (this.nav.classList.contains("cs-open") ? this.closeDrawer() : this.openDrawer()));
      document.getElementById("cs-side-close").addEventListener("click", () => this.closeDrawer());
      document.getElementById("cs-new-chat").addEventListener("click", () => this.newChat());
      this.scrim.addEventListener("click", () => this.closeDrawer());
      this.nav.addEventListener("keydown", (event) => {
        if (event.key !== "Escape") return;
        event.preventDefault();
        if (this.menu) this.closeMenu(true);
        else this.closeDrawer();
      });
      document.addEventListener("click", (event) => {
        if (this.menu && !this.menu.parentNode.contains(event.target)) this.closeMenu(false);
      });
    }

    async refresh() {
      if (!this.available) return;
      const result = await requestJson("GET", "conversations?limit=100");
      if (result.ok && result.data && Array.isArray(result.data.data)) this.render(result.data.data);
    }

    render(conversations) {
      this.menu = null;
      this.list.textContent = "";
      for (const conv of conversations) this.list.appendChild(this.item(conv));
      this.markCurrent();
    }

    markCurrent() {
      for (const li of this.list.children) {
        const current = li.dataset.id === this.app.conversationId;
        li.dataset.current = String(current);
        const open = li.querySelector(".cs-conv-open");
        if (current) open.setAttribute("aria-current", "true");
        else open.removeAttribute("aria-current");
      }
    }

    item(conv) {
      const title = conv.title || this.t.untitled;
      const li = el("li", "cs-conv");
      li.dataset.id = conv.id;
      const open = el("button", "cs-conv-open", title);
      open.type = "button";
      open.title = title;
      open.addEventListener("click", () => this.select(conv.id));
      const more = iconButton("more", format(this.t.moreActions, { title: title }), () => this.toggleMenu(li, conv));
      more.setAttribute("aria-haspopup", "menu");
      more.setAttribute("aria-expanded", "false");
      li.append(open, more);
      return li;
    }

    toggleMenu(li, conv) {
      const wasOpen = this.menu && this.menu.parentNode === li;
      this.closeMenu(false);
      if (wasOpen) return;
      const menu = el("div", "cs-conv-menu");
      menu.setAttribute("role", "menu");
      const rename = this.menuButton("rename", this.t.rename, () => this.startRename(li, conv));
      const remove = this.menuButton("delete", this.t.delete, () => this.confirmDelete(conv));
      menu.append(rename, this.exportLink(conv, "markdown", this.t.exportMarkdown), this.exportLink(conv, "json", this.t.exportJson), remove);
      li.appendChild(menu);
      this.menu = menu;
      li.querySelector('[data-action="more"]').setAttribute("aria-expanded", "true");
      rename.focus();
    }

    closeMenu(focusButton) {
      if (!this.menu) return;
      const li = this.menu.parentNode;
      this.menu.remove();
      this.menu = null;
      const more = li.querySelector('[data-action="more"]');
      more.setAttribute("aria-expanded", "false");
      if (focusButton) more.focus();
    }

    menuButton(action, label, onClick) {
      const button = el("button", "", label);
      button.type = "button";
      button.dataset.action = action;
      button.setAttribute("role", "menuitem");
      button.addEventListener("click", onClick);
      return button;
    }

    exportLink(conv, exportFormat, label) {
      const link = el("a", "", label);
      link.href = apiUrl(conversationPath(conv.id, "/export?format=" + exportFormat));
      link.setAttribute("download", "");
      link.setAttribute("role", "menuitem");
      link.dataset.action = "export-" + exportFormat;
      link.addEventListener("click", () => this.closeMenu(false));
      return link;
    }

    startRename(li, conv) {
      this.closeMenu(false);
      const open = li.querySelector(".cs-conv-open");
      const input = el("input", "cs-conv-rename");
      input.type = "text";
      input.maxLength = 200;
      input.value = conv.title;
      input.setAttribute("aria-label", this.t.titleLabel);
      open.hidden = true;
      li.insertBefore(input, open);
      input.focus();
      input.select();
      let done = false;
      const finish = async (save) => {
        if (done) return;
        done = true;
        if (save && input.value.trim() !== conv.title) await this.rename(conv.id, input.value);
        await this.refresh();
      };
      input.addEventListener("keydown", (event) => {
        if (event.isComposing || event.keyCode === 229) return; // Enter that confirms an IME conversion
        if (event.key === "Enter") { event.preventDefault(); finish(true); }
        if (event.key === "Escape") { event.preventDefault(); event.stopPropagation(); finish(false); }
      });
      input.addEventListener("blur", () => finish(true));
    }

    async rename(id, title) {
      const result = await requestJson("POST", conversationPath(id), { title: title });
      if (!result.ok) this.app.toast(result.status === 403 ? this.t.forbidden : this.t.renameFailed);
    }

    async confirmDelete(conv) {
      this.closeMenu(false);
      if (!(await this.confirm(format(this.t.confirmDelete, { title: conv.title || this.t.untitled })))) return;
      const result = await requestJson("DELETE", conversationPath(conv.id));
      if (!result.ok) {
        this.app.toast(result.status === 403 ? this.t.forbidden : this.t.deleteFailed);
        return;
      }
      if (conv.id === this.app.conversationId) await this.app.startOver();
      this.app.toast(this.t.deleted);
      await this.refresh();
    }

    /** A modal yes/no question (the page's own dialog; the browser's confirm() where <dialog> is missing). */
    confirm(text) {
      if (typeof this.dialog.showModal !== "function") return Promise.resolve(window.confirm(text));
      document.getElementById("cs-confirm-text").textContent = text;
      this.dialog.returnValue = "";
      return new Promise((resolve) => {
        this.dialog.addEventListener("close", () => resolve(this.dialog.returnValue === "ok"), { once: true });
        this.dialog.showModal();
        document.getElementById("cs-confirm-cancel").focus();
      });
    }

    async select(id) {
      this.closeDrawer();
      if (id !== this.app.conversationId) await this.app.openConversation(id, true);
    }

    async newChat() {
      this.closeDrawer();
      await this.app.clear(false);
      await this.refresh();
    }

    openDrawer() {
      this.nav.classList.add("cs-open");
      this.scrim.hidden = false;
      this.toggle.setAttribute("aria-expanded", "true");
      document.getElementById("cs-new-chat").focus();
    }

    closeDrawer() {
      if (!this.nav.classList.contains("cs-open")) return;
      const hadFocus = this.nav.contains(document.activeElement);
      this.nav.classList.remove("cs-open");
      this.scrim.hidden = true;
      this.toggle.setAttribute("aria-expanded", "false");
      if (hadFocus) this.toggle.focus();
    }
  }

  // ---------------------------------------------------------------- the chat
  class ChatApp {
    constructor(settings) {
      this.settings = settings;
      this.t = settings.t;
      this.main = document.getElementById("cs-main");
      this.log = document.getElementById("cs-messages");
      this.form = document.getElementById("cs-form");
      this.input = document.getElementById("cs-input");
      this.sendButton = document.getElementById("cs-send");
      this.stopButton = document.getElementById("cs-stop");
      this.announcer = document.getElementById("cs-announce");
      this.toastBox = document.getElementById("cs-toast");
      this.generating = false;
      this.composing = false;
      this.controller = null;
      this.running = Promise.resolve();
      this.lastAnswer = null;
      this.pendingText = null;
      this.frame = 0;
      this.toastTimer = 0;
      this.dev = new DevPanel(this);
      this.conversationId = null; // the stored conversation on screen (null: the next turn starts one)
      this.sidebar = new ConversationSidebar(this);
      this.ready = settings.clearContextOnReload ? requestJson("POST", "clear_context") : Promise.resolve();
    }

    start() {
      this.applyLabels();
      this.bindComposer();
      document.getElementById("cs-clear").addEventListener("click", () => this.clear());
      let devSeen = false;
      try { devSeen = sessionStorage.getItem(DEVTOOL_KEY) === "1"; } catch (err) { devSeen = false; }
      if (this.settings.developMode || devSeen) this.dev.enable();
      this.showWelcome();
      this.updateComposer();
      this.sidebar.start();
    }

    applyLabels() {
      const t = this.t;
      document.documentElement.lang = this.settings.lang;
      for (const node of document.querySelectorAll("[data-label]")) {
        if (t[node.dataset.label]) node.textContent = t[node.dataset.label];
      }
      const title = document.title.includes("__CHATSTREAM_TITLE__") ? "ChatStream" : document.title;
      document.title = title;
      document.getElementById("cs-title").textContent = title;
      for (const id of ["cs-clear", "cs-dev-toggle"]) {
        const button = document.getElementById(id);
        button.setAttribute("aria-label", button.querySelector(".cs-btn-label").textContent);
      }
      this.input.placeholder = this.settings.placeholder;
      document.getElementById("cs-stop-label").textContent = this.settings.stopLabel;
    }

    bindComposer() {
      this.form.addEventListener("submit", (event) => { event.preventDefault(); this.submit(); });
      this.input.addEventListener("compositionstart", () => { this.composing = true; });
      this.input.addEventListener("compositionend", () => { this.composing = false; });
      this.input.addEventListener("keydown", (event) => this.onKeyDown(event));
      this.input.addEventListener("input", () => this.updateComposer());
      this.stopButton.addEventListener("click", () => this.stop());
    }

    onKeyDown(event) {
      if (event.key === "Escape" && this.generating) {
        event.preventDefault();
        this.stop();
        return;
      }
      if (event.key !== "Enter" || event.shiftKey) return;
      // Enter that confirms an IME conversion (Japanese input) must not send the message.
      if (event.isComposing || event.keyCode === 229 || this.composing) return;
      event.preventDefault();
      this.submit();
    }

    updateComposer() {
      this.input.style.height = "auto";
      this.input.style.height = Math.min(this.input.scrollHeight, 200) + "px";
      this.sendButton.disabled = this.generating || !this.input.value.trim();
    }

    submit() {
      const text = this.input.value;
      if (this.generating || !text.trim()) return;
      this.input.value = "";
      this.updateComposer();
      const user = new MessageView("user", this.settings);
      user.setPlain(text);
      this.append(user);
      const answer = new MessageView("assistant", this.settings);
      answer.user = user;
      this.append(answer);
      this.running = this.run(answer, { user_input: text });
    }

    append(view) {
      this.log.appendChild(view.root);
      this.scrollToEnd(true);
    }

    scrollToEnd(force) {
      const gap = this.main.scrollHeight - this.main.scrollTop - this.main.clientHeight;
      if (force || gap < 120) this.main.scrollTop = this.main.scrollHeight;
    }

    setGenerating(on) {
      this.generating = on;
      this.log.setAttribute("aria-busy", on ? "true" : "false");
      const stopHadFocus = document.activeElement === this.stopButton;
      this.stopButton.hidden = !on;
      this.sendButton.hidden = on;
      for (const button of this.log.querySelectorAll('[data-action="regenerate"]')) button.disabled = on;
      this.updateComposer();
      if (!on && stopHadFocus) this.input.focus();
    }

    announce(text) {
      this.announcer.textContent = "";
      setTimeout(() => { this.announcer.textContent = text; }, 30);
    }

    toast(text) {
      this.toastBox.textContent = text;
      this.toastBox.hidden = false;
      clearTimeout(this.toastTimer);
      this.toastTimer = setTimeout(() => { this.toastBox.hidden = true; }, 3000);
    }

    showWelcome() {
      if (!this.settings.welcomeMessage) return;
      const welcome = new MessageView("assistant", this.settings);
      welcome.root.classList.add("cs-welcome");
      welcome.setMarkdown(this.settings.welcomeMessage);
      this.log.appendChild(welcome.root);
    }

    /** Render at most once per frame: the stream may deliver many segments between two paints. */
    renderStreaming(view, text) {
      this.pendingText = text;
      if (this.frame) return;
      this.frame = requestAnimationFrame(() => {
        this.frame = 0;
        if (this.pendingText === null) return;
        view.setMarkdown(this.pendingText);
        this.pendingText = null;
        this.scrollToEnd(false);
      });
    }

    flushRender() {
      if (this.frame) cancelAnimationFrame(this.frame);
      this.frame = 0;
      this.pendingText = null;
    }

    async run(view, body) {
      await this.ready;
      view.setThinking();
      view.setState("streaming");
      view.setStreaming(true);
      this.setGenerating(true);
      this.announce(this.t.generating);
      this.controller = new AbortController();
      const onText = (text) => this.renderStreaming(view, text);
      const result = await streamChat(body, this.controller.signal, onText, this.conversationHeader());
      this.flushRender();
      this.controller = null;
      view.setStreaming(false);
      this.setGenerating(false);
      if (result.devTool) this.enableDevTool();
      this.finish(view, body, result);
      this.scrollToEnd(false);
      if (result.conversationId && view.root.isConnected) {
        this.conversationId = result.conversationId;
        this.sidebar.refresh();
      }
    }

    finish(view, body, result) {
      const t = this.t;
      if (!view.root.isConnected) return; // the conversation was cleared meanwhile
      const retry = () => this.retry(view, body);
      if (result.kind === "busy") {
        const message = result.retryAfter ? format(t.busyAfter, { s: result.retryAfter }) : t.busy;
        view.showAlert("busy", message, t.retry, retry);
      } else if (result.kind === "network") {
        view.showAlert("error", t.network, t.retry, retry);
      } else if (result.kind === "forbidden") {
        view.showAlert("error", t.forbidden, t.retry, retry);
      } else if (result.kind === "bad_request") {
        view.showAlert("error", format(t.badRequest, { detail: result.detail || "HTTP " + result.status }), t.retry, retry);
      } else if (result.kind === "server") {
        view.showAlert("error", format(t.server, { status: result.status }), t.retry, retry);
      } else {
        this.finishAnswer(view, result);
      }
    }

    finishAnswer(view, result) {
      view.setMarkdown(result.text);
      view.messageId = result.messageId;
      view.root.dataset.messageId = result.messageId;
      view.feedback = null;
      view.setState(result.kind === "aborted" ? "stopped" : result.kind);
      if (result.kind === "aborted") view.setNote(this.t.stopped);
      if (result.kind === "interrupted") view.setNote(this.t.interrupted);
      if (result.kind === "done" && !result.text) view.setNote(this.t.empty);
      if (result.kind === "done" && PROMOTION_RE.test(result.text)) {
        // The pass phrase never enters the history: hide it on screen too, and offer no actions on this reply.
        if (view.user) view.user.setPlain("••••••  " + this.t.hiddenPhrase);
        view.setState("promotion");
        return;
      }
      this.lastAnswer = view;
      this.buildActions(view);
      this.dev.refreshAfterTurn();
    }

    buildActions(view) {
      const t = this.t;
      view.actions.textContent = "";
      view.actions.appendChild(iconButton("copy", t.copy, () => this.copy(view)));
      if (view.messageId) {
        view.likeButton = iconButton("like", t.like, () => this.sendFeedback(view, true));
        view.dislikeButton = iconButton("dislike", t.dislike, () => this.sendFeedback(view, false));
        view.likeButton.setAttribute("aria-pressed", "false");
        view.dislikeButton.setAttribute("aria-pressed", "false");
        view.actions.append(view.likeButton, view.dislikeButton);
      }
      if (this.settings.regenerateEnabled) {
        for (const old of this.log.querySelectorAll('[data-action="regenerate"]')) old.remove();
        view.actions.appendChild(iconButton("regenerate", this.settings.regenerateLabel, () => this.regenerate(view), true));
      }
      view.actions.hidden = false;
    }

    retry(view, body) {
      if (this.generating || !view.root.isConnected) return;
      this.running = this.run(view, body);
    }

    regenerate(view) {
      if (this.generating || view !== this.lastAnswer) return;
      this.running = this.run(view, { user_input: null, regenerate: true });
    }

    stop() {
      if (this.controller) this.controller.abort();
    }

    enableDevTool() {
      try { sessionStorage.setItem(DEVTOOL_KEY, "1"); } catch (err) { /* storage may be disabled */ }
      if (this.dev.toggle.hidden) {
        this.dev.enable();
        this.toast(this.t.devEnabled);
      }
    }

    async copy(view) {
      try {
        await navigator.clipboard.writeText(view.text);
        this.toast(this.t.copied);
      } catch (err) {
        this.toast(format(this.t.requestFailed, { status: "clipboard" }));
      }
    }

    async sendFeedback(view, isLike) {
      const body = { is_like: isLike, message_id: view.messageId, form_data: null };
      const result = await requestJson("POST", "set_feedback", body, this.conversationHeader());
      if (!(result.ok && result.data && result.data.success)) {
        this.toast(this.t.feedbackFailed);
        return;
      }
      view.feedback = isLike;
      view.likeButton.setAttribute("aria-pressed", String(isLike));
      view.dislikeButton.setAttribute("aria-pressed", String(!isLike));
      this.toast(this.t.thanks);
    }

    async clear(announce) {
      this.stop();
      await this.running; // let an aborted answer settle before the history is dropped
      const result = await requestJson("POST", "clear_context");
      const data = result.data || {};
      if (!(result.ok && (data.success || data.message === "no context."))) {
        this.toast(result.status === 403 ? this.t.forbidden : this.t.clearFailed);
        return;
      }
      await this.startOver();
      if (announce !== false) this.toast(this.t.cleared);
      this.sidebar.refresh();
      this.input.focus();
    }

    /** Names the conversation on screen to the server (the body stays the original protocol's). */
    conversationHeader() {
      return this.conversationId ? { "X-ChatStream-Conversation-Id": this.conversationId } : {};
    }

    /** An empty chat: the next turn starts a new conversation. */
    async startOver() {
      this.stop();
      await this.running;
      this.log.textContent = "";
      this.lastAnswer = null;
      this.conversationId = null;
      this.showWelcome();
      this.sidebar.markCurrent();
      this.dev.refreshAfterTurn();
    }

    /** Show a stored conversation (``makeCurrent``: also for this session's next visit); later turns continue it. */
    async openConversation(id, makeCurrent) {
      this.stop();
      await this.running;
      const result = await requestJson("GET", conversationPath(id, "/items"));
      if (!(result.ok && result.data && Array.isArray(result.data.data))) {
        this.toast(this.t.loadFailed);
        return;
      }
      if (makeCurrent) await requestJson("POST", conversationPath(id, "/open"));
      this.log.textContent = "";
      this.lastAnswer = null;
      this.conversationId = id;
      this.showWelcome();
      let user = null;
      for (const item of result.data.data) user = this.appendStored(item, user);
      this.scrollToEnd(true);
      this.sidebar.markCurrent();
      this.dev.refreshAfterTurn();
    }

    /** One stored message (an OpenAI-style item) into the log; returns the latest user view. */
    appendStored(item, user) {
      if (item.role !== "user" && item.role !== "assistant") return user; // a prompt format's opening example
      const text = Array.isArray(item.content) && item.content[0] ? String(item.content[0].text || "") : "";
      const view = new MessageView(item.role === "user" ? "user" : "assistant", this.settings);
      this.log.appendChild(view.root);
      if (item.role === "user") {
        view.setPlain(text);
        return view;
      }
      view.user = user;
      view.setMarkdown(text);
      view.messageId = String(item.id || "");
      view.root.dataset.messageId = view.messageId;
      view.setState("done");
      if (!text) view.setNote(this.t.empty);
      this.lastAnswer = view;
      this.buildActions(view);
      if (item.feedback && view.likeButton) {
        view.feedback = item.feedback.is_like === true;
        view.likeButton.setAttribute("aria-pressed", String(view.feedback));
        view.dislikeButton.setAttribute("aria-pressed", String(!view.feedback));
      }
      return user;
    }
  }

  function init() {
    const app = new ChatApp(buildSettings(readParams()));
    app.start();
    window.ChatStreamUI = { app: app, renderMarkdown: renderMarkdown, escapeHtml: escapeHtml };
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
