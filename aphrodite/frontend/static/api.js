// Calls to the server's OpenAI API: JSON requests with the API key as a Bearer token, errors
// as readable messages, and server-sent events read from a fetch() body.

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// Paths are relative to the page, so the playground also works behind a path prefix.
export async function call(path, {key = "", body, signal} = {}) {
  const headers = {};
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method: body === undefined ? "GET" : "POST", headers, signal,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, `Cannot reach the server (${error.message}).`);
  }
  if (!response.ok) throw await errorOf(response, key);
  return response;
}

async function errorOf(response, key) {
  let message = response.statusText;
  try {
    message = (await response.json()).error?.message || message;
  } catch {
    // not JSON: keep the status text
  }
  if (response.status === 401) {
    message = key ? `The API key was not accepted (401: ${message}).`
      : `This server needs an API key: enter it in the API key field (401: ${message}).`;
  } else {
    message = `${response.status}: ${message}`;
  }
  return new ApiError(response.status, message);
}

// The JSON objects of a server-sent event stream, up to `data: [DONE]`. An error event
// ({"error": {...}}) becomes an ApiError.
export async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true}).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const event = JSON.parse(data);
      if (event.error) throw new ApiError(event.error.code || 500, event.error.message);
      yield event;
    }
  }
}
