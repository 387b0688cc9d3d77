// The page's logic: load the export folder with onnxruntime-web (WASM, one thread) and decode greedily.
// URL parameters: ?model=URL of the export folder (default ../model/, which serve.py maps to the
// export folder), &text=... or &ids=5,17,42 (ids clear the text), &tokens=16, &autorun=1 to generate
// on load (the headless test uses that).
import * as ort from './node_modules/onnxruntime-web/dist/ort.wasm.min.mjs';
import { eosTokenId, greedyGenerate } from '../decoder.mjs';
import { loadTokenizer } from '../tokenizer.mjs';

const params = new URLSearchParams(location.search);
const modelUrl = new URL(params.get('model') || '../model/', location.href).href.replace(/\/?$/, '/');
const $ = (id) => document.getElementById(id);
if (params.get('ids')) {
  $('prompt').value = params.get('ids');
  $('text-prompt').value = '';
}
if (params.get('text')) $('text-prompt').value = params.get('text');
if (params.get('tokens')) $('max-new-tokens').value = params.get('tokens');
$('model-url').textContent = modelUrl;

// One thread: multi-threaded WASM needs a cross-origin-isolated page (COOP/COEP headers).
ort.env.wasm.numThreads = 1;
ort.env.wasm.wasmPaths = new URL('./node_modules/onnxruntime-web/dist/', location.href).href;

function setStatus(status, message) {
  document.body.dataset.status = status;
  $('status').textContent = message;
}

async function fetchJson(name) {
  const response = await fetch(modelUrl + name);
  return response.ok ? response.json() : null;
}

async function load() {
  const report = await fetchJson('export_report.json');
  const graphName = (report && report.graph && report.graph.graph) || 'model.onnx';
  const options = { executionProviders: ['wasm'] };
  const external = report && report.graph && report.graph.external_data;
  if (external) options.externalData = [{ path: external, data: modelUrl + external }];
  const session = await ort.InferenceSession.create(modelUrl + graphName, options);
  const eos = eosTokenId(await fetchJson('generation_config.json'), await fetchJson('config.json'));
  const tokenizer = await loadTokenizer(await fetchJson('tokenizer.json'));
  return { session, eos, tokenizer };
}

async function run(model) {
  const text = $('text-prompt').value;
  if (text && !(model.tokenizer && model.tokenizer.encode)) {
    throw new Error('the folder has no byte-level BPE tokenizer.json to encode text with; clear the text and give ids');
  }
  if (text) $('prompt').value = model.tokenizer.encode(text).join(',');
  const ids = $('prompt').value.split(',').filter((t) => t.trim()).map(Number);
  const maxNewTokens = Number($('max-new-tokens').value);
  setStatus('running', 'generating…');
  const started = performance.now();
  const newIds = await greedyGenerate(ort, model.session, ids, maxNewTokens, model.eos);
  const seconds = (performance.now() - started) / 1000;
  $('tokens').textContent = newIds.join(' ');
  $('text').textContent = model.tokenizer ? model.tokenizer.decode(newIds) : '(no tokenizer.json in the folder)';
  setStatus('done', `done: ${newIds.length} tokens in ${seconds.toFixed(2)} s`);
}

try {
  const model = await load();
  setStatus('ready', 'ready');
  $('run').onclick = () => run(model).catch((e) => setStatus('error', `error: ${e.message}`));
  if (params.get('autorun')) await run(model);
} catch (error) {
  setStatus('error', `error: ${error.message}`);
}
