#!/usr/bin/env node
// Greedy generation with a prefix-export folder on onnxruntime-node (CPU).
//
//   node js/node/generate.mjs OUT_DIR --prompt "text" [--max-new-tokens 32] [--ignore-eos] [--json]
//   node js/node/generate.mjs OUT_DIR --token-ids 5,17,42 ...
//
// Prints the new token ids (space-separated) and, when the folder has a byte-level BPE or
// SentencePiece-style tokenizer.json, their text; with --json one object. --prompt needs a GPT-2-style
// byte-level BPE tokenizer.json (js/tokenizer.mjs); --token-ids works with any folder.
import fs from 'node:fs';
import path from 'node:path';
import * as ort from 'onnxruntime-node';
import { eosTokenId, greedyGenerate } from '../decoder.mjs';
import { loadTokenizer } from '../tokenizer.mjs';

function usage(message) {
  if (message) console.error(`generate.mjs: ${message}`);
  console.error('usage: node generate.mjs OUT_DIR (--prompt TEXT | --token-ids 1,2,3) [--max-new-tokens N] ' +
    '[--ignore-eos] [--json]');
  process.exit(2);
}

function parseArgs(argv) {
  const args = { folder: null, tokenIds: null, prompt: null, maxNewTokens: 32, ignoreEos: false, json: false, threads: 1 };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--token-ids') args.tokenIds = argv[++i];
    else if (arg === '--prompt') args.prompt = argv[++i];
    else if (arg === '--max-new-tokens') args.maxNewTokens = Number(argv[++i]);
    else if (arg === '--threads') args.threads = Number(argv[++i]);
    else if (arg === '--ignore-eos') args.ignoreEos = true;
    else if (arg === '--json') args.json = true;
    else if (arg === '-h' || arg === '--help') usage();
    else if (arg.startsWith('-')) usage(`unknown option ${arg}`);
    else if (args.folder === null) args.folder = arg;
    else usage(`unexpected argument ${arg}`);
  }
  if (!args.folder) usage('OUT_DIR is required');
  if ((args.tokenIds === null) === (args.prompt === null)) usage('give --prompt TEXT or --token-ids 1,2,3 (one of them)');
  if (args.tokenIds !== null) {
    const ids = args.tokenIds.split(',').filter((t) => t.trim() !== '').map(Number);
    if (!ids.length || ids.some((t) => !Number.isInteger(t) || t < 0)) {
      usage(`--token-ids ${JSON.stringify(args.tokenIds)}: expected comma-separated non-negative integers`);
    }
    args.tokenIds = ids;
  }
  if (!Number.isInteger(args.maxNewTokens) || args.maxNewTokens < 1) usage('--max-new-tokens must be a positive integer');
  return args;
}

function readJson(file) {
  return fs.existsSync(file) ? JSON.parse(fs.readFileSync(file, 'utf8')) : null;
}

/** The folder's graph: model.onnx, or its only .onnx file. */
function graphPath(folder) {
  if (!fs.existsSync(folder) || !fs.statSync(folder).isDirectory()) {
    throw new Error(`${folder} is not a folder; expected an export folder written by prefix-export`);
  }
  if (fs.existsSync(path.join(folder, 'model.onnx'))) return path.join(folder, 'model.onnx');
  const graphs = fs.readdirSync(folder).filter((f) => f.endsWith('.onnx'));
  if (graphs.length !== 1) throw new Error(`${folder}: expected one .onnx graph, found ${graphs.length ? graphs : 'none'}`);
  return path.join(folder, graphs[0]);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const tokenizer = loadTokenizer(readJson(path.join(graphPath(args.folder), '..', 'tokenizer.json')));
  if (args.prompt !== null) {
    if (!tokenizer || !tokenizer.encode) {
      throw new Error(`${args.folder} has no GPT-2-style byte-level BPE tokenizer.json that js/tokenizer.mjs can ` +
        'encode with; pass --token-ids instead');
    }
    args.tokenIds = tokenizer.encode(args.prompt);
  }
  const session = await ort.InferenceSession.create(graphPath(args.folder), {
    executionProviders: ['cpu'], intraOpNumThreads: args.threads, interOpNumThreads: 1,
  });
  const eos = args.ignoreEos ? null : eosTokenId(readJson(path.join(args.folder, 'generation_config.json')),
    readJson(path.join(args.folder, 'config.json')));
  const started = performance.now();
  const newIds = await greedyGenerate(ort, session, args.tokenIds, args.maxNewTokens, eos);
  const seconds = (performance.now() - started) / 1000;
  const text = tokenizer ? tokenizer.decode(newIds) : null;
  if (args.json) {
    console.log(JSON.stringify({ folder: args.folder, prompt_token_ids: args.tokenIds, new_token_ids: newIds, text,
      eos_token_id: eos, seconds: Number(seconds.toFixed(4)), onnxruntime_node: ort.env.versions.node }));
  } else {
    console.log(newIds.join(' '));
    if (text !== null) console.log(text);
  }
}

main().catch((error) => {
  console.error(`generate.mjs: ${error.message}`);
  process.exit(1);
});
