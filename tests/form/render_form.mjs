#!/usr/bin/env node
// Render the fine-tuning recipe JSON Schema with react-jsonschema-form (rjsf) and report what a user would see.
//
// The platform UI generates its recipe form from recipes/schema.json with a standard JSON-Schema form library.
// This script does that for real: rjsf's default theme (@rjsf/core) on React 18, rendered into a jsdom document
// (no browser), validated by ajv in JSON Schema 2020-12 mode. It then reads the DOM back and prints one JSON
// report on stdout:
//
//   versions          the installed packages
//   fields            the form as first shown (no data: schema defaults only), keyed by rjsf id
//                     (root_training_learning_rate): kind, label, description, input type, shown value,
//                     min/max/step, readonly, <select> options, and the anyOf/oneOf selector rjsf adds, if any
//   recipe_fields     the same for the form opened on the recipe given on the command line
//   method_full       the root_method* fields after the user picks "Full fine-tuning" in the method selector
//   method_qlora      the same after picking "QLoRA"
//   choices           what a few <select> choices put into the form data (e.g. ZeRO stage "2" -> 2)
//   validation        what rjsf + ajv report when the form is submitted with (a) no data ("empty"), (b) the
//                     recipe ("valid"), (c) the recipe with gpus 16 and LoRA rank 0 ("invalid")
//   discriminator     whether ajv accepts the schema with its `discriminator` support on (so that only the chosen
//                     method's errors are reported), and the errors for (c) in that mode
//   console           anything React or rjsf wrote to console.error / console.warn meanwhile
//
// Usage:  node tests/form/render_form.mjs recipes/schema.json [recipe.json]
// The recipe (JSON, optional) defaults to a minimal valid one. tests/test_form_render.py runs this and checks the
// report; install the pinned packages first with `npm ci --prefix tests/form`.

import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { JSDOM } from 'jsdom';

const [schemaPath, recipePath] = process.argv.slice(2);
if (!schemaPath) {
  console.error('usage: node render_form.mjs SCHEMA.json [RECIPE.json]');
  process.exit(2);
}
const schema = JSON.parse(readFileSync(schemaPath, 'utf8'));
const validRecipe = recipePath
  ? JSON.parse(readFileSync(recipePath, 'utf8'))
  : { model: { id: 'llama-3.2-1b-instruct' }, data: { path: 'data/train.jsonl' } };

// ---------------------------------------------------------------------------------------------------- the DOM
// React DOM decides at import time whether it runs in a browser, so the jsdom globals come first and React,
// ReactDOM and rjsf are imported (dynamically) only afterwards.
const { window } = new JSDOM('<!doctype html><html><body></body></html>', { pretendToBeVisual: true });
for (const name of ['window', 'document', 'navigator']) {
  const value = name === 'window' ? window : window[name];
  Object.defineProperty(globalThis, name, { value, configurable: true, writable: true });
}
globalThis.IS_REACT_ACT_ENVIRONMENT = true; // lets React.act flush renders and effects synchronously

// Collect React / rjsf warnings instead of letting them clutter stderr; they go into the report.
const consoleMessages = [];
for (const level of ['error', 'warn']) {
  console[level] = (...args) => consoleMessages.push(`${level}: ${args.map(String).join(' ')}`.slice(0, 500));
}

const React = (await import('react')).default;
const { createRoot } = (await import('react-dom/client')).default;
const Form = (await import('@rjsf/core')).default;
const { customizeValidator } = await import('@rjsf/validator-ajv8');
// The schema declares "$schema": draft 2020-12, so ajv must run in its 2020-12 mode (ajv's default class is
// draft-07). Ajv is CommonJS: the module's default export is the class.
const Ajv2020 = (await import('ajv/dist/2020.js')).default;
const validator = customizeValidator({ AjvClass: Ajv2020 });

const h = React.createElement;
const { act } = React;

// ------------------------------------------------------------------------------------------ rendering a form
// Mount <Form schema validator formData onChange onError onSubmit> in a fresh container.
function mount(formData) {
  const container = document.createElement('div');
  document.body.appendChild(container);
  const root = createRoot(container);
  const events = { formData, errors: null, submitted: null };
  const element = h(Form, {
    schema,
    validator,
    formData,
    onChange: ({ formData: data }) => {
      events.formData = data;
    },
    onError: (errors) => {
      events.errors = errors;
    },
    onSubmit: ({ formData: data }) => {
      events.submitted = data;
    },
  });
  act(() => root.render(element));
  return {
    container,
    events,
    unmount() {
      act(() => root.unmount());
      container.remove();
    },
  };
}

// Visible text of a node, without the "*" rjsf appends to the labels of required fields.
function text(node) {
  if (!node) return null;
  const copy = node.cloneNode(true);
  copy.querySelectorAll('.required').forEach((star) => star.remove());
  return copy.textContent.replace(/\s+/g, ' ').trim();
}

const byId = (container, id) => container.querySelector(`[id="${id}"]`);
const SELECTOR_SUFFIXES = ['__anyof_select', '__oneof_select'];

// What a <select> offers and shows.
function readSelect(select) {
  return {
    options: [...select.options].map(text),
    selected: select.selectedIndex >= 0 ? text(select.options[select.selectedIndex]) : null,
  };
}

// One rendered field, as a user sees it. rjsf gives every field an id built from its path (root_data_format);
// its <label for=id> (or the <legend> of a section, or the <label> wrapping a checkbox) shows the schema title,
// and the element #id__description the schema description. anyOf / oneOf fields get an extra <select>
// (#id__anyof_select / #id__oneof_select) to pick the option; the chosen option's own field is rendered below it.
function readField(container, id) {
  const field = { id };
  const fieldset = container.querySelector(`fieldset[id="${id}"]`);
  const control = container.querySelector(`input[id="${id}"], select[id="${id}"], textarea[id="${id}"]`);
  field.kind = fieldset ? 'section' : control ? control.tagName.toLowerCase() : 'field';

  const label = container.querySelector(`label[for="${id}"]`) ?? control?.closest('label');
  const legend = fieldset?.querySelector(':scope > legend');
  field.label = text(label) ?? text(legend);
  if (legend && label) field.legend = text(legend); // e.g. the method section: label "Method", legend "LoRA"
  field.required = Boolean((label ?? legend)?.querySelector('.required'));
  field.description = text(byId(container, `${id}__description`));

  if (control?.tagName === 'INPUT') {
    field.input_type = control.type;
    field.value = control.type === 'checkbox' ? control.checked : control.value;
    for (const attr of ['min', 'max', 'step']) {
      if (control.hasAttribute(attr)) field[attr] = control.getAttribute(attr);
    }
    const examples = control.list; // <datalist> rjsf renders from "examples"
    if (examples) field.examples = [...examples.options].map((o) => o.value);
  } else if (control?.tagName === 'SELECT') {
    Object.assign(field, readSelect(control));
  } else if (control) {
    field.value = control.value;
  }
  if (control) {
    field.readonly = control.readOnly || control.disabled || control.type === 'hidden';
  }
  for (const suffix of SELECTOR_SUFFIXES) {
    const selector = byId(container, id + suffix);
    if (selector) field.selector = { id: selector.id, ...readSelect(selector) };
  }
  return field;
}

// Every field of the rendered form, in page order, keyed by rjsf id.
function readFields(container, prefix = 'root') {
  const ids = [];
  for (const node of container.querySelectorAll('label[for], fieldset[id], input[id], select[id], textarea[id]')) {
    const id = node.htmlFor || node.id;
    if (!id.startsWith(prefix) || SELECTOR_SUFFIXES.some((s) => id.endsWith(s)) || ids.includes(id)) continue;
    ids.push(id);
  }
  return Object.fromEntries(ids.map((id) => [id, readField(container, id)]));
}

// Pick an option of a <select> by its visible text, the way a user does: set the value, fire "change".
function choose(mounted, selectId, optionLabel) {
  const select = byId(mounted.container, selectId);
  const option = select && [...select.options].find((o) => text(o) === optionLabel);
  if (!option) return { select: selectId, option: optionLabel, error: 'no such select or option' };
  act(() => {
    select.value = option.value;
    select.dispatchEvent(new window.Event('change', { bubbles: true }));
  });
  return { select: selectId, option: optionLabel };
}

// Submit the form (as its submit button does) and return what rjsf/ajv reported: the errors handed to onError,
// the messages rendered under each field, and the error list rjsf shows at the top of the form.
function submit(mounted) {
  const { container, events } = mounted;
  events.errors = null;
  events.submitted = null;
  act(() => {
    container.querySelector('form').dispatchEvent(new window.Event('submit', { bubbles: true, cancelable: true }));
  });
  const shown = {};
  for (const list of container.querySelectorAll('[id$="__error"]')) {
    const messages = [...list.querySelectorAll('li')].map(text).filter(Boolean);
    if (messages.length) shown[list.id.replace(/__error$/, '')] = messages;
  }
  return {
    submitted: events.submitted !== null,
    errors: (events.errors ?? []).map(simpleError),
    shown_at_fields: shown,
    error_list: [...container.querySelectorAll('.errors li, .panel-danger li')].map(text),
  };
}

const simpleError = ({ property, name, message, params, schemaPath }) => ({
  property,
  name,
  message,
  params,
  schemaPath,
});

// ------------------------------------------------------------------------------------------------ the checks
const started = performance.now();
const report = { versions: {} };

// Installed versions, read from node_modules (some packages do not export their package.json).
const here = dirname(fileURLToPath(import.meta.url));
for (const pkg of ['react', 'react-dom', '@rjsf/core', '@rjsf/utils', '@rjsf/validator-ajv8', 'ajv', 'jsdom']) {
  report.versions[pkg] = JSON.parse(readFileSync(join(here, 'node_modules', pkg, 'package.json'), 'utf8')).version;
}

// The form as a user first sees it (no data: schema defaults only), then the user's choices in it.
{
  const form = mount(undefined);
  report.fields = readFields(form.container);

  // Each choice is recorded with what it put into the form data (rjsf's onChange).
  report.choices = [];
  const pick = (selectId, optionLabel, read) => {
    const done = choose(form, selectId, optionLabel);
    report.choices.push({ ...done, form_data: read(form.events.formData) ?? null });
  };

  // A mixed-type enum ("auto", 0, 2, 3): the chosen option must reach the form data as the number 2.
  pick('root_resources_zero_stage', '2', (data) => data?.resources?.zero_stage);

  // Switch the method through the oneOf selector rjsf renders, as a user would.
  pick('root_method__oneof_select', 'Full fine-tuning', (data) => data?.method);
  report.method_full = readFields(form.container, 'root_method');
  pick('root_method__oneof_select', 'QLoRA', (data) => data?.method);
  report.method_qlora = readFields(form.container, 'root_method');
  form.unmount();
}

// The form opened on the given recipe: its values must show.
{
  const form = mount(validRecipe);
  report.recipe_fields = readFields(form.container);
  form.unmount();
}

// Validation on submit: (a) empty, (b) the valid recipe, (c) the valid recipe with gpus 16 and rank 0.
const invalidRecipe = structuredClone(validRecipe);
invalidRecipe.resources = { ...(invalidRecipe.resources ?? {}), gpus: 16 };
invalidRecipe.method = { ...(invalidRecipe.method ?? {}), type: 'lora', rank: 0 };
report.validation = {};
for (const [name, data] of Object.entries({ empty: undefined, valid: validRecipe, invalid: invalidRecipe })) {
  const form = mount(data);
  report.validation[name] = submit(form);
  form.unmount();
}

// ajv's `discriminator` option reports only the errors of the oneOf branch the discriminator picks, instead of
// every branch's. It needs the discriminator property required in each branch and no "mapping".
try {
  new Ajv2020({ strict: false, discriminator: true }).compile(schema); // throws when ajv cannot use it
  const strict = customizeValidator({ AjvClass: Ajv2020, ajvOptionsOverrides: { discriminator: true } });
  const { errors } = strict.validateFormData(invalidRecipe, schema);
  report.discriminator = { accepted: true, invalid_errors: errors.map(simpleError) };
} catch (error) {
  report.discriminator = { accepted: false, error: error.message };
}

report.console = consoleMessages;
report.elapsed_ms = Math.round(performance.now() - started);
process.stdout.write(JSON.stringify(report, null, 2) + '\n');
