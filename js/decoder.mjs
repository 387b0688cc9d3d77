// Greedy decoding of a prefix-export graph with any onnxruntime JavaScript package (node or web).
//
// The loop follows the graph's I/O contract (prefix_export/contract.py), exactly what a runtime does
// for the plain base model: the user's token ids only, `position_ids` counted from 0, the cache
// `present.{i}.key/value` (B, H_kv, past + seq, D) fed back as `past_key_values.{i}.key/value`.
// The prefix is folded inside the graph, so nothing here knows about it. Batch size is 1.
//
// `ort` is passed in (onnxruntime-node or onnxruntime-web), so Node and the browser share this file.

const PAST_PREFIX = 'past_key_values.';

/** float16 bits (Uint16) -> number, for graphs exported in half precision. */
function halfToFloat(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
  if (exponent === 0x1f) return fraction ? NaN : sign * Infinity;
  return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
}

/** Index of the largest value in data[offset, offset + length) (first one on ties, like numpy). */
export function argmax(data, offset, length, isHalf) {
  let best = 0;
  let bestValue = -Infinity;
  for (let i = 0; i < length; i++) {
    const value = isHalf ? halfToFloat(data[offset + i]) : data[offset + i];
    if (value > bestValue) {
      bestValue = value;
      best = i;
    }
  }
  return best;
}

/** What the graph says about its cache: past names, (H_kv, D) and dtype, from the session's metadata. */
export function describeSession(session) {
  const names = session.inputNames;
  for (const required of ['input_ids', 'attention_mask', 'position_ids']) {
    if (!names.includes(required)) {
      throw new Error(`the graph lacks input ${required}; it was not exported by prefix-export (inputs: ${names})`);
    }
  }
  const pastNames = names.filter((n) => n.startsWith(PAST_PREFIX));
  const first = session.inputMetadata.find((m) => m.name === pastNames[0]);
  if (!first || !first.shape || typeof first.shape[1] !== 'number' || typeof first.shape[3] !== 'number') {
    throw new Error(`expected ${pastNames[0]} of shape (batch_size, H_kv, past_sequence_length, D) with fixed H_kv ` +
      `and D, got ${JSON.stringify(first && first.shape)}`);
  }
  return { pastNames, numKvHeads: first.shape[1], headDim: first.shape[3], kvType: first.type };
}

function int64Tensor(ort, values, dims) {
  return new ort.Tensor('int64', BigInt64Array.from(values, (v) => BigInt(v)), dims);
}

/**
 * Greedy decoding: returns the new token ids (at most maxNewTokens; stops after eosTokenId when given).
 * promptIds: array of numbers. eosTokenId: a number, an array of numbers, or null.
 */
export async function greedyGenerate(ort, session, promptIds, maxNewTokens, eosTokenId = null) {
  if (!promptIds.length) throw new Error('the prompt is empty; give at least one token id');
  const { pastNames, numKvHeads, headDim, kvType } = describeSession(session);
  const eos = new Set(eosTokenId == null ? [] : [].concat(eosTokenId));
  const emptyData = kvType === 'float16' ? new Uint16Array(0) : new Float32Array(0);
  let past = Object.fromEntries(pastNames.map((n) => [n, new ort.Tensor(kvType, emptyData, [1, numKvHeads, 0, headDim])]));
  let tokens = promptIds.slice();
  let start = 0; // position of tokens[0]
  const generated = [];
  for (let step = 0; step < maxNewTokens; step++) {
    const seq = tokens.length;
    const total = start + seq;
    const feeds = {
      input_ids: int64Tensor(ort, tokens, [1, seq]),
      attention_mask: int64Tensor(ort, new Array(total).fill(1), [1, total]),
      position_ids: int64Tensor(ort, Array.from({ length: seq }, (_, i) => start + i), [1, seq]),
      ...past,
    };
    const outputs = await session.run(feeds);
    const logits = outputs.logits; // (1, seq, V)
    const vocab = logits.dims[2];
    const next = argmax(logits.data, (seq - 1) * vocab, vocab, logits.type === 'float16');
    generated.push(next);
    if (eos.has(next)) break;
    past = Object.fromEntries(pastNames.map((n) => [n, outputs[n.replace(PAST_PREFIX, 'present.')]]));
    start = total;
    tokens = [next];
  }
  return generated;
}

/** eos id(s) from generation_config.json, then config.json (objects already parsed; either may be null). */
export function eosTokenId(generationConfig, config) {
  for (const source of [generationConfig, config]) {
    if (source && source.eos_token_id != null) return source.eos_token_id;
  }
  return null;
}
