// The sampler form: one input per entry of GET /v1/samplers (type, default, range, effect),
// grouped, plus the usage guide's presets. collect() returns only the values that differ from
// the server's defaults, so the request carries what the user chose and nothing else.

// The usage guide's presets ("Presets for Different Use Cases").
export const PRESETS = {
  "Creative Writing": {temperature: 0.9, top_p: 0.95, repetition_penalty: 1.15, min_p: 0.05},
  "Dialogue/Chat": {temperature: 0.85, top_p: 0.9, repetition_penalty: 1.2,
                    frequency_penalty: 0.2},
  "Factual/Precise": {temperature: 0.3, top_p: 0.9, repetition_penalty: 1.1},
  "Experimental/Wild": {temperature: 1.2, top_p: 0.95, top_k: 100, min_p: 0.01},
};

// Where the page starts from the server's default: a reply longer than 16 tokens, and
// 5 alternatives per token for the probability view.
const PAGE_VALUES = {max_tokens: 256, logprobs: 5};

// [title, open at start, reset by a preset, names or name prefixes (ending in "_")]
const GROUPS = [
  ["Length and stopping", true, false,
   ["max_tokens", "min_tokens", "n", "stop", "stop_token_ids", "include_stop_str_in_output",
    "ignore_eos"]],
  ["Temperature", true, true, ["temperature", "dynatemp_", "temperature_last"]],
  ["Truncation", true, true,
   ["top_p", "top_k", "min_p", "top_a", "tfs", "typical_p", "eta_cutoff", "epsilon_cutoff",
    "nsigma"]],
  ["Penalties", false, true,
   ["repetition_penalty", "frequency_penalty", "presence_penalty", "repetition_penalty_range",
    "no_repeat_ngram_size"]],
  ["DRY", false, true, ["dry_"]],
  ["XTC, smoothing and skew", false, true, ["xtc_", "smoothing_", "skew"]],
  ["Mirostat", false, true, ["mirostat_"]],
  ["Tokens and order", false, false,
   ["seed", "logit_bias", "allowed_token_ids", "banned_token_ids", "bad_words",
    "sampler_priority"]],
  ["Output", false, false, ["logprobs", "prompt_logprobs", "logprobs_mode", "skip_special_",
                            "spaces_between_special_tokens"]],
  ["Structured output", false, false, ["structured_outputs", "response_format", "guided_"]],
];
const OTHER = ["Other", false, false, []];

function groupOf(name) {
  const matches = (entry) => entry.endsWith("_") ? name.startsWith(entry) : name === entry;
  return GROUPS.find((group) => group[3].some(matches)) || OTHER;
}

// "[0, 2]", "(0, 1]", ">= 1", "> 0", "-1, 0 (off) or >= 1" -> {min, max}; open bounds are
// left to the server's check.
export function parseRange(text) {
  const pair = /^[[(]\s*(-?[\d.e+]+),\s*(-?[\d.e+]+)\s*[\])]$/.exec(text);
  if (pair) return {min: Number(pair[1]), max: Number(pair[2])};
  const lows = [...text.matchAll(/(-?\d+(?:\.\d+)?)/g)].map((m) => Number(m[1]));
  if (/^>=?\s*-?[\d.]/.test(text) || /or >= /.test(text)) return {min: Math.min(...lows)};
  return {};
}

const isNumeric = (type) => /^(int|float)(\|null)?$/.test(type);
const isJson = (type) => /^(list|dict)/.test(type);

function show(value) {
  if (value === null || value === undefined) return "none";
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

export class SamplerForm {
  constructor(container, presetSelect) {
    this.container = container;
    this.presetSelect = presetSelect;
    this.specs = new Map();     // name -> spec from /v1/samplers
    this.inputs = new Map();    // name -> the element holding the value
  }

  render(specs) {
    this.container.replaceChildren();
    const sections = new Map();
    for (const group of [...GROUPS, OTHER]) {
      const details = document.createElement("details");
      details.className = "group";
      details.open = group[1];
      details.dataset.group = group[0];
      details.innerHTML = `<summary>${group[0]}</summary>`;
      sections.set(group, details);
    }
    for (const spec of specs) {
      this.specs.set(spec.name, spec);
      sections.get(groupOf(spec.name)).append(this.field(spec));
    }
    for (const details of sections.values()) {
      if (details.children.length > 1) this.container.append(details);
    }
    this.renderPresets();
  }

  field(spec) {
    const row = document.createElement("div");
    row.className = "sampler";
    row.title = spec.effect;
    const id = `s-${spec.name}`;
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = spec.name;
    const hint = document.createElement("small");
    hint.textContent = `${spec.range} · default ${show(spec.default)}`;
    const input = this.input(spec, id);
    row.append(label, input);
    if (input.type === "number" && "max" in input.dataset) row.append(this.slider(input));
    row.append(hint);
    this.inputs.set(spec.name, input);
    this.set(spec.name, spec.name in PAGE_VALUES ? PAGE_VALUES[spec.name] : spec.default);
    return row;
  }

  input(spec, id) {
    let input;
    const options = spec.type === "str" ? spec.range.split(" | ") : [];
    if (spec.type === "bool") {
      input = document.createElement("input");
      input.type = "checkbox";
    } else if (options.length > 1) {
      input = document.createElement("select");
      for (const option of options) input.add(new Option(option, option));
    } else if (isNumeric(spec.type)) {
      input = document.createElement("input");
      input.type = "number";
      input.step = spec.type.startsWith("int") ? "1" : "any";
      input.placeholder = "none";
      const {min, max} = parseRange(spec.range);
      if (min !== undefined) input.min = input.dataset.min = min;
      if (max !== undefined) input.max = input.dataset.max = max;
    } else {
      input = document.createElement("input");
      input.type = "text";
      input.placeholder = isJson(spec.type) ? "JSON" : "none";
      input.spellcheck = false;
    }
    input.id = id;
    input.name = spec.name;
    return input;
  }

  slider(number) {
    const slider = document.createElement("input");
    slider.type = "range";
    slider.min = number.dataset.min;
    slider.max = number.dataset.max;
    slider.step = number.step === "1" ? "1" : String((number.max - number.min) / 200);
    slider.tabIndex = -1;
    slider.setAttribute("aria-hidden", "true");
    slider.value = number.value;
    slider.addEventListener("input", () => { number.value = slider.value; });
    number.addEventListener("input", () => { slider.value = number.value; });
    number.slider = slider;
    return slider;
  }

  set(name, value) {
    const input = this.inputs.get(name);
    if (!input) return;
    const spec = this.specs.get(name);
    if (input.type === "checkbox") input.checked = Boolean(value);
    else if (value === null || value === undefined) input.value = "";
    else input.value = isJson(spec.type) ? JSON.stringify(value) : String(value);
    if (input.slider) input.slider.value = input.value;
  }

  renderPresets() {
    this.presetSelect.replaceChildren(new Option("Server defaults", ""));
    for (const name of Object.keys(PRESETS)) this.presetSelect.add(new Option(name, name));
    this.presetSelect.addEventListener("change", () => this.applyPreset(this.presetSelect.value));
  }

  // A preset starts from the server's defaults for the sampling groups, so switching from one
  // preset to another leaves nothing of the first behind.
  applyPreset(name) {
    for (const [field, spec] of this.specs) {
      if (groupOf(field)[2]) this.set(field, spec.default);
    }
    for (const [field, value] of Object.entries(PRESETS[name] || {})) this.set(field, value);
  }

  // {name: value} for every input that differs from the server's default; throws an Error
  // naming the field when a JSON field does not parse.
  collect() {
    const values = {};
    for (const [name, input] of this.inputs) {
      const spec = this.specs.get(name);
      let value;
      if (input.type === "checkbox") value = input.checked;
      else if (input.value.trim() === "") value = null;
      else if (isNumeric(spec.type)) value = Number(input.value);
      else if (isJson(spec.type)) {
        try {
          value = JSON.parse(input.value);
        } catch {
          throw new Error(`${name}: not valid JSON (${spec.range})`);
        }
      } else value = input.value;
      if (JSON.stringify(value) !== JSON.stringify(spec.default)) values[name] = value;
    }
    return values;
  }
}
