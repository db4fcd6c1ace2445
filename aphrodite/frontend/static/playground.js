// The playground: chat and completion modes against this server's OpenAI API, streamed
// with fetch() and stopped with an AbortController (closing the connection aborts the
// engine's request).

import {ApiError, call, events} from "./api.js";
import {SamplerForm} from "./samplers.js";
import {TokenView, chatEntries, completionEntries, installPopup} from "./tokens.js";

const $ = (id) => document.getElementById(id);
const ui = {
  chatTab: $("mode-chat"), completionTab: $("mode-completion"), model: $("model"),
  key: $("api-key"), error: $("error"), chatPane: $("chat-pane"),
  completionPane: $("completion-pane"), system: $("system"), log: $("chat-log"),
  message: $("message"), prompt: $("prompt"), output: $("output"), send: $("send"),
  stop: $("stop"), clear: $("clear"), status: $("status"), stats: $("stats"),
  popup: $("token-popup"),
};
const state = {mode: "chat", messages: [], controller: null, samplersLoaded: false};
const form = new SamplerForm($("samplers"), $("preset"));

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

function setBusy(busy, status) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
  ui.clear.disabled = busy;
  document.body.dataset.state = busy ? "generating" : "idle";
  ui.status.textContent = status;
}

// ---- models and samplers: loaded at start and again when the API key changes ------------
async function loadServerInfo() {
  const key = ui.key.value.trim();
  try {
    const models = await (await call("v1/models", {key})).json();
    const chosen = ui.model.value;
    ui.model.replaceChildren(...models.data.map((m) => new Option(m.id, m.id)));
    if (models.data.some((m) => m.id === chosen)) ui.model.value = chosen;
    if (!state.samplersLoaded) {
      form.render((await (await call("v1/samplers", {key})).json()).data);
      state.samplersLoaded = true;
    }
    showError("");
    if (!state.controller) setBusy(false, "ready");
  } catch (error) {
    showError(error.message);
    if (!state.controller) {
      setBusy(false, error.status === 401 ? "needs an API key" : "server unavailable");
    }
  }
}

// ---- requests ----------------------------------------------------------------------------
function requestBody() {
  const samplers = form.collect();
  const body = {model: ui.model.value || undefined, stream: true,
                stream_options: {include_usage: true}, ...samplers};
  if (state.mode === "chat") {
    // the chat API takes logprobs as a flag and the number of alternatives apart
    const top = samplers.logprobs ?? null;
    delete body.logprobs;
    if (top !== null) Object.assign(body, {logprobs: true, top_logprobs: top});
    const system = ui.system.value.trim();
    body.messages = [...(system ? [{role: "system", content: system}] : []), ...state.messages];
  } else {
    body.prompt = ui.prompt.value;
  }
  return body;
}

function bubble(role) {
  const item = document.createElement("div");
  item.className = `msg ${role}`;
  item.innerHTML = `<span class="role">${role}</span><div class="text"></div>`;
  ui.log.append(item);
  return item.querySelector(".text");
}

function describe(usage, counted, times, finished) {
  const completion = usage ? usage.completion_tokens : counted;
  const parts = [];
  if (usage) parts.push(`${usage.prompt_tokens} prompt`);
  parts.push(`${completion} completion tokens`);
  if (times.first !== null && completion > 1 && times.last > times.first) {
    parts.push(`${((completion - 1) / ((times.last - times.first) / 1000)).toFixed(1)} tokens/s`);
  }
  if (times.first !== null) {
    parts.push(`first token ${((times.first - times.start) / 1000).toFixed(2)} s`);
  }
  if (finished) parts.push(finished);
  return parts.join(" · ");
}

async function generate() {
  showError("");
  let body;
  try {
    if (state.mode === "chat") {
      const text = ui.message.value;
      if (!text.trim()) return;
      state.messages.push({role: "user", content: text});
      bubble("user").textContent = text;
      ui.message.value = "";
    }
    body = requestBody();
  } catch (error) {
    showError(error.message);
    return;
  }
  const chat = state.mode === "chat";
  const target = chat ? bubble("assistant") : ui.output;
  if (!chat) target.replaceChildren();
  const views = [];   // one TokenView per choice index (n > 1 shows every choice)
  const viewFor = (index) => {
    if (!views[index]) {
      const box = document.createElement("div");
      box.className = "choice";
      target.append(box);
      views[index] = new TokenView(box);
    }
    return views[index];
  };
  viewFor(0);
  state.controller = new AbortController();
  const times = {start: performance.now(), first: null, last: null};
  let usage = null;
  let finish = "";
  setBusy(true, "generating…");
  ui.stats.textContent = "";
  try {
    const path = chat ? "v1/chat/completions" : "v1/completions";
    const response = await call(path, {key: ui.key.value.trim(), body,
                                       signal: state.controller.signal});
    for await (const event of events(response)) {
      usage = event.usage || usage;
      for (const choice of event.choices || []) {
        const text = chat ? choice.delta?.content : choice.text;
        const entries = chat ? chatEntries(choice.logprobs) : completionEntries(choice.logprobs);
        if (text || entries.length) {
          times.first ??= performance.now();
          times.last = performance.now();
        }
        viewFor(choice.index).add(text, entries);
        if (choice.finish_reason) finish = `finished: ${choice.finish_reason}`;
        if (choice.finish_reason === "error") showError("Generation failed; see the server log.");
      }
      const counted = views.reduce((sum, view) => sum + view.tokens, 0);
      ui.stats.textContent = describe(usage, counted, times, "");
    }
    setBusy(false, "done");
  } catch (error) {
    if (error.name === "AbortError") {
      finish = "stopped";
      setBusy(false, "stopped");
    } else {
      showError(error instanceof ApiError ? error.message : `Error: ${error.message}`);
      setBusy(false, "failed");
      if (chat && !views.some((view) => view.tokens || view.fullText)) {
        // nothing came back: the message goes back to the box, to send again
        ui.message.value = state.messages.pop().content;
        ui.log.lastChild.remove();
        ui.log.lastChild.remove();
        return;
      }
    }
  } finally {
    views.forEach((view) => view.finish());
    state.controller = null;
  }
  const counted = views.reduce((sum, view) => sum + view.tokens, 0);
  ui.stats.textContent = describe(usage, counted, times, finish);
  if (chat) state.messages.push({role: "assistant", content: views[0].fullText});
}

// ---- wiring ------------------------------------------------------------------------------
function setMode(mode) {
  state.mode = mode;
  ui.chatTab.setAttribute("aria-selected", String(mode === "chat"));
  ui.completionTab.setAttribute("aria-selected", String(mode === "completion"));
  ui.chatPane.hidden = mode !== "chat";
  ui.completionPane.hidden = mode !== "completion";
  document.body.dataset.mode = mode;
}

ui.chatTab.addEventListener("click", () => setMode("chat"));
ui.completionTab.addEventListener("click", () => setMode("completion"));
ui.send.addEventListener("click", generate);
ui.stop.addEventListener("click", () => state.controller?.abort());
ui.clear.addEventListener("click", () => {
  state.messages = [];
  ui.log.replaceChildren();
  ui.output.replaceChildren();
  ui.stats.textContent = "";
  showError("");
});
for (const box of [ui.message, ui.prompt]) {
  box.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !ui.send.disabled) {
      generate();
    }
  });
}
ui.key.addEventListener("change", loadServerInfo);
installPopup(ui.popup);
setMode("chat");
setBusy(true, "loading…");
ui.stop.disabled = true;
loadServerInfo();
