// A Hugging Face tokenizer.json in plain JavaScript, for what prompts and outputs need.
// decode(ids): byte-level BPE (GPT-2, Llama 3, Qwen...) and SentencePiece-style metaspace ('▁' for
// spaces, <0xNN> byte tokens). encode(text): GPT-2-style byte-level BPE only (a ByteLevel
// pre-tokenizer with its regex, no normalizer, merges by rank); `encode` is null for anything else.

/** GPT-2's byte <-> printable-character table. */
function byteDecoder() {
  const bytes = [];
  for (let b = 33; b <= 126; b++) bytes.push(b);
  for (let b = 161; b <= 172; b++) bytes.push(b);
  for (let b = 174; b <= 255; b++) bytes.push(b);
  const chars = bytes.slice();
  let extra = 0;
  for (let b = 0; b < 256; b++) {
    if (!bytes.includes(b)) {
      bytes.push(b);
      chars.push(256 + extra++);
    }
  }
  return new Map(chars.map((c, i) => [String.fromCharCode(c), bytes[i]]));
}

function decoderKinds(decoder) {
  if (!decoder) return [];
  if (decoder.type === 'Sequence') return decoder.decoders.flatMap(decoderKinds);
  return [decoder.type];
}

// GPT-2's pre-tokenizer split: contractions, letters, numbers, other symbols, whitespace.
const GPT2_SPLIT = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

/** text -> ids for a byte-level BPE tokenizer.json, or null when its pipeline is not GPT-2's. */
function byteLevelEncoder(json, table) {
  const model = json.model;
  const pre = json.pre_tokenizer;
  if (model.type !== 'BPE' || json.normalizer || !pre || pre.type !== 'ByteLevel' || pre.use_regex === false ||
      model.continuing_subword_prefix || model.end_of_word_suffix || model.byte_fallback || model.dropout) {
    return null;
  }
  // Special tokens the post-processor wraps a single sequence with (none for GPT-2).
  let before = [];
  let after = [];
  const post = json.post_processor;
  if (post && post.type === 'TemplateProcessing') {
    let seen = false;
    for (const item of post.single) {
      if (item.Sequence) seen = true;
      else if (item.SpecialToken) (seen ? after : before).push(...post.special_tokens[item.SpecialToken.id].ids);
    }
  } else if (post && post.type !== 'ByteLevel') {
    return null;
  }
  const byteToChar = new Map([...table].map(([ch, b]) => [b, ch]));
  const ranks = new Map(model.merges.map((m, i) => [Array.isArray(m) ? m.join(' ') : m, i]));
  const vocab = model.vocab;
  const utf8 = new TextEncoder();
  const cache = new Map();
  function bpe(word) {
    if (cache.has(word)) return cache.get(word);
    let parts = Array.from(word);
    if (!(model.ignore_merges && word in vocab)) {
      while (parts.length > 1) {
        let best = -1;
        let bestRank = Infinity;
        for (let i = 0; i < parts.length - 1; i++) {
          const rank = ranks.get(parts[i] + ' ' + parts[i + 1]);
          if (rank !== undefined && rank < bestRank) {
            bestRank = rank;
            best = i;
          }
        }
        if (best < 0) break;
        const merged = parts[best] + parts[best + 1];
        const next = [];
        for (let i = 0; i < parts.length; i++) {
          if (i < parts.length - 1 && parts[i] + parts[i + 1] === merged &&
              ranks.get(parts[i] + ' ' + parts[i + 1]) === bestRank) {
            next.push(merged);
            i++;
          } else {
            next.push(parts[i]);
          }
        }
        parts = next;
      }
    } else {
      parts = [word];
    }
    const ids = parts.map((p) => {
      if (!(p in vocab)) throw new Error(`token ${JSON.stringify(p)} is not in the vocabulary`);
      return vocab[p];
    });
    cache.set(word, ids);
    return ids;
  }
  return (text) => {
    const input = pre.add_prefix_space && !text.startsWith(' ') ? ' ' + text : text;
    const ids = [...before];
    for (const piece of input.match(GPT2_SPLIT) || []) {
      const word = Array.from(utf8.encode(piece), (b) => byteToChar.get(b)).join('');
      ids.push(...bpe(word));
    }
    return ids.concat(after);
  };
}

/** A {decode(ids), encode(text) or null} object for tokenizer.json's contents, or null when there is none or it is not supported. */
export function loadTokenizer(json) {
  if (!json || !json.model || !json.model.vocab || Array.isArray(json.model.vocab)) return null;
  const idToToken = new Map(Object.entries(json.model.vocab).map(([token, id]) => [id, token]));
  const special = new Set();
  for (const added of json.added_tokens || []) {
    idToToken.set(added.id, added.content);
    if (added.special) special.add(added.id);
  }
  const kinds = decoderKinds(json.decoder);
  const utf8 = new TextDecoder('utf-8');
  if (kinds.includes('ByteLevel')) {
    const table = byteDecoder();
    return {
      encode: byteLevelEncoder(json, table),
      decode(ids) {
        const bytes = [];
        for (const id of ids) {
          if (special.has(id) || !idToToken.has(id)) continue;
          for (const ch of idToToken.get(id)) bytes.push(table.has(ch) ? table.get(ch) : ch.charCodeAt(0));
        }
        return utf8.decode(new Uint8Array(bytes));
      },
    };
  }
  if (kinds.includes('Metaspace') || kinds.includes('ByteFallback') || kinds.includes('Replace')) {
    return {
      encode: null,
      decode(ids) {
        const bytes = [];
        for (const id of ids) {
          if (special.has(id) || !idToToken.has(id)) continue;
          const token = idToToken.get(id);
          const byte = /^<0x([0-9A-Fa-f]{2})>$/.exec(token);
          if (byte) bytes.push(parseInt(byte[1], 16));
          else bytes.push(...new TextEncoder().encode(token.replaceAll('\u2581', ' ')));
        }
        return utf8.decode(new Uint8Array(bytes)).replace(/^ /, '');
      },
    };
  }
  return null;
}
