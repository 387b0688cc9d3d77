// Token ids -> text from a Hugging Face tokenizer.json, for the two common decoders: byte-level BPE
// (GPT-2, Llama 3, Qwen...) and SentencePiece-style metaspace ('▁' for spaces, <0xNN> byte tokens).
// Decoding only: encoding text needs the model's pre-tokenizer and merges; the contract is token ids.

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

/** A {decode(ids)} object for tokenizer.json's contents, or null when there is none or it is not supported. */
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
