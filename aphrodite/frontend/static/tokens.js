// Generated text as one span per token, coloured by the token's probability, and the popup
// that shows a token's probability and its top alternatives.
//
// The text shown is always the server's text (content/text deltas). Token entries (from
// logprobs) are matched against it in order: a token's text starts the unmatched text ->
// it becomes a span. Text that is not matched yet (held back for a stop string, or a
// character split over several byte tokens) shows as plain text until it is.

const REPLACEMENT = "\uFFFD";   // what a token that ends inside a UTF-8 character decodes to

export const probability = (logprob) => Math.exp(logprob);
export const percent = (p) => `${(100 * p).toFixed(p >= 0.1 ? 1 : 2)}%`;

// A chat logprobs.content entry, or one position of a legacy completions logprobs object,
// as {token, logprob, top: [{token, logprob}]}.
export function chatEntries(logprobs) {
  return (logprobs?.content || []).map((e) => ({
    token: e.token, logprob: e.logprob,
    top: (e.top_logprobs || []).map((t) => ({token: t.token, logprob: t.logprob})),
  }));
}

export function completionEntries(logprobs) {
  if (!logprobs) return [];
  return logprobs.tokens.map((token, i) => ({
    token, logprob: logprobs.token_logprobs[i],
    top: Object.entries(logprobs.top_logprobs?.[i] || {})
      .map(([alt, logprob]) => ({token: alt, logprob})),
  }));
}

export class TokenView {
  constructor(container) {
    this.container = container;
    this.pending = [];          // token entries whose text has not arrived yet
    this.text = "";             // arrived text not yet matched to a token
    this.plain = document.createTextNode("");
    this.container.append(this.plain);
    this.tokens = 0;            // entries received
  }

  get fullText() {
    return this.container.textContent;
  }

  add(text, entries) {
    this.text += text || "";
    this.pending.push(...entries);
    this.tokens += entries.length;
    this.match();
  }

  match() {
    while (this.pending.length && this.text) {
      const head = this.pending[0];
      if (head.token && this.text.startsWith(head.token)) {
        this.span(head.token, this.pending.shift());
      } else if (!head.token || head.token.includes(REPLACEMENT)) {
        // byte tokens of one character: the first one stands for the character
        let run = 0;
        while (run < this.pending.length && (!this.pending[run].token ||
               this.pending[run].token.includes(REPLACEMENT))) run += 1;
        const [character] = this.text;
        this.span(character, this.pending[0]);
        this.pending.splice(0, run);
      } else {
        break;                  // the token's text is still held back by the server
      }
    }
    this.plain.textContent = this.text;
  }

  // The stream ended: unmatched text goes to the next unmatched token, or stays plain.
  finish() {
    this.match();
    if (this.text && this.pending.length) this.span(this.text, this.pending[0]);
    this.pending = [];
    this.plain.textContent = this.text;
  }

  span(text, entry) {
    const span = document.createElement("span");
    span.className = "tok";
    span.textContent = text;
    span.tabIndex = 0;
    span.style.setProperty("--p", probability(entry.logprob).toFixed(3));
    span.entry = entry;
    this.container.insertBefore(span, this.plain);
    this.text = this.text.slice(text.length);
  }
}

const quoted = (token) => JSON.stringify(token);

function showPopup(popup, span) {
  const {token, logprob, top} = span.entry;
  const p = probability(logprob);
  popup.replaceChildren();
  const head = document.createElement("p");
  head.className = "chosen";
  head.innerHTML = "<code></code> <strong></strong> <small></small>";
  head.querySelector("code").textContent = quoted(token);
  head.querySelector("strong").textContent = percent(p);
  head.querySelector("small").textContent = `logprob ${logprob.toFixed(3)}`;
  const list = document.createElement("ol");
  list.className = "alternatives";
  for (const alt of top) {
    const item = document.createElement("li");
    const q = probability(alt.logprob);
    item.style.setProperty("--p", q.toFixed(3));
    item.classList.toggle("is-chosen", alt.token === token);
    item.innerHTML = "<code></code><span></span>";
    item.querySelector("code").textContent = quoted(alt.token);
    item.querySelector("span").textContent = percent(q);
    list.append(item);
  }
  popup.append(head, list.children.length ? list : document.createTextNode(
    "No alternatives: set logprobs above 0."));
  popup.hidden = false;
  const box = span.getBoundingClientRect();
  const width = popup.offsetWidth;
  const left = Math.max(8, Math.min(box.left, window.innerWidth - width - 8));
  popup.style.left = `${left + window.scrollX}px`;
  popup.style.top = `${box.bottom + window.scrollY + 6}px`;
}

// One listener for every token view: click, tap or Enter on a token opens its popup.
export function installPopup(popup) {
  const open = (event) => {
    const span = event.target.closest?.(".tok");
    if (span && span.entry) {
      showPopup(popup, span);
      event.stopPropagation();
    } else if (!popup.contains(event.target)) {
      popup.hidden = true;
    }
  };
  document.addEventListener("click", open);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") popup.hidden = true;
    else if (event.key === "Enter" && event.target.classList?.contains("tok")) open(event);
  });
}
