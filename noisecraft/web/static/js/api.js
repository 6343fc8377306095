// The server's HTTP and websocket APIs, as the pages use them.  Every failed call throws an
// Error whose message is the server's own explanation (its {"error": {"message"}} body).

export class ApiError extends Error {}

export async function call(method, path, body) {
  let answer;
  try {
    answer = await fetch(path, {
      method, headers: body === undefined ? {} : { "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(`cannot reach the noisecraft server (${method} ${path}): ${e.message}. ` +
      "Is `noisecraft serve` still running?");
  }
  const text = await answer.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (!answer.ok) {
    const why = data?.error?.message ?? data?.detail ?? (typeof data === "string" ? data : "");
    throw new ApiError(`${method} ${path} failed (HTTP ${answer.status}): ${why || answer.statusText}`);
  }
  return data;
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body);

export function blobToBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

export function viewURL(image) {
  const q = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder ?? "",
    type: image.type ?? "output" });
  return `/view?${q}`;
}

// One websocket (/ws?clientId=...) with handlers per prompt id; binary frames are the step
// previews (4-byte event type, 4-byte image type, then JPEG/PNG bytes).
export class Events {
  constructor() {
    this.clientId = crypto.randomUUID ? crypto.randomUUID().replaceAll("-", "")
      : String(Math.random()).slice(2);
    this.handlers = new Map();
    this.current = null;
    this.ready = this.connect();
  }

  connect() {
    return new Promise((resolve) => {
      const scheme = location.protocol === "https:" ? "wss" : "ws";
      const ws = new WebSocket(`${scheme}://${location.host}/ws?clientId=${this.clientId}`);
      ws.binaryType = "arraybuffer";
      ws.onopen = () => resolve(true);
      ws.onerror = () => resolve(false);
      ws.onclose = () => { this.ws = null; };
      ws.onmessage = (ev) => this.dispatch(ev.data);
      this.ws = ws;
    });
  }

  watch(promptId, handler) { this.handlers.set(promptId, handler); this.current = promptId; }
  unwatch(promptId) { this.handlers.delete(promptId); }

  dispatch(data) {
    if (data instanceof ArrayBuffer) {
      const type = new DataView(data).getUint32(4);
      const blob = new Blob([data.slice(8)], { type: type === 2 ? "image/png" : "image/jpeg" });
      this.handlers.get(this.current)?.({ type: "preview", blob });
      return;
    }
    const msg = JSON.parse(data);
    const id = msg.data?.prompt_id;
    if (id && this.handlers.has(id)) {
      this.current = id;
      this.handlers.get(id)(msg);
    }
  }
}

// Wait for a job to finish: websocket events when they come, /history polling as a fallback.
export function waitJob(events, promptId, onEvent) {
  return new Promise((resolve, reject) => {
    let done = false;
    const finish = async () => {
      if (done) return;
      const hist = await get(`/history/${promptId}`).catch(() => ({}));
      const entry = hist?.[promptId];
      if (!entry) return;
      done = true;
      clearInterval(timer);
      events.unwatch(promptId);
      if (entry.status?.completed) { resolve(entry); return; }
      const failure = (entry.status?.messages ?? []).find((m) => m[0] !== "execution_start");
      const data = failure?.[1] ?? {};
      reject(new ApiError(data.exception_message ?? data.message ?? "the job failed " +
        `(${entry.status?.status_str ?? "unknown status"})`));
    };
    events.watch(promptId, (msg) => {
      onEvent?.(msg);
      if (["execution_success", "execution_error", "execution_interrupted"].includes(msg.type)) {
        finish();
      }
    });
    const timer = setInterval(finish, 1500);
  });
}
