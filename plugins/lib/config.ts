// Plugin configuration helpers shared by the filters.
//
// Configuration arrives as one string. Filters accept either a flat JSON
// object (string, number, boolean or null values; no nesting) or a plain
// string shorthand, so a conf file can say `proxy_wasm auth_token secret;`
// as well as pass JSON. A full JSON library is not worth its size here.

import { get_buffer_bytes, BufferTypeValues } from "@solo-io/proxy-runtime/runtime";

// RootContext.onConfigure in SDK 0.1.8 hands the configuration length to the
// host as the address to write the returned size to, so the host scribbles
// four bytes at that address (heap corruption once a config passes ~1 KiB),
// and it aborts on an empty configuration. Reading the buffer through the
// runtime helper passes proper out-pointers, and an empty or missing
// configuration comes back as "" for the filter to judge.
export function readPluginConfiguration(size: u32): string {
  if (size == 0) return "";
  return String.UTF8.decode(get_buffer_bytes(BufferTypeValues.PluginConfiguration, 0, size));
}

const QUOTE: i32 = 0x22;     // "
const BACKSLASH: i32 = 0x5c; // \
const COLON: i32 = 0x3a;
const COMMA: i32 = 0x2c;
const LBRACE: i32 = 0x7b;
const RBRACE: i32 = 0x7d;

function isSpace(c: i32): bool {
  return c == 0x20 || c == 0x09 || c == 0x0a || c == 0x0d;
}

export function looksLikeJsonObject(s: string): bool {
  return s.trim().startsWith("{");
}

// Cursor over the configuration text; `ok` turns false on the first error.
class Scanner {
  s: string;
  i: i32 = 0;
  ok: bool = true;

  constructor(s: string) {
    this.s = s;
  }

  skipSpace(): void {
    while (this.i < this.s.length && isSpace(this.s.charCodeAt(this.i))) this.i++;
  }

  peek(): i32 {
    return this.i < this.s.length ? this.s.charCodeAt(this.i) : -1;
  }

  expect(c: i32): void {
    this.skipSpace();
    if (this.peek() != c) { this.ok = false; return; }
    this.i++;
  }

  // A string literal starting at the opening quote, escapes decoded.
  str(): string {
    this.skipSpace();
    if (this.peek() != QUOTE) { this.ok = false; return ""; }
    this.i++;
    let out = "";
    let start = this.i;
    while (this.i < this.s.length) {
      const c = this.s.charCodeAt(this.i);
      if (c == QUOTE) {
        out += this.s.substring(start, this.i);
        this.i++;
        return out;
      }
      if (c == BACKSLASH) {
        out += this.s.substring(start, this.i);
        if (this.i + 1 >= this.s.length) break;
        const e = this.s.charCodeAt(this.i + 1);
        this.i += 2;
        if (e == 0x6e) out += "\n";
        else if (e == 0x74) out += "\t";
        else if (e == 0x72) out += "\r";
        else if (e == 0x62) out += "\b";
        else if (e == 0x66) out += "\f";
        else if (e == 0x75) { // \uXXXX
          if (this.i + 4 > this.s.length) break;
          out += String.fromCharCode(<i32>parseInt(this.s.substring(this.i, this.i + 4), 16));
          this.i += 4;
        } else out += String.fromCharCode(e); // \" \\ \/
        start = this.i;
        continue;
      }
      this.i++;
    }
    this.ok = false; // unterminated string
    return "";
  }

  // A bare scalar (number, true, false, null) kept as its source text.
  bare(): string {
    this.skipSpace();
    const start = this.i;
    while (this.i < this.s.length) {
      const c = this.s.charCodeAt(this.i);
      if (c == COMMA || c == RBRACE || isSpace(c)) break;
      if (c == LBRACE || c == 0x5b || c == QUOTE) { this.ok = false; return ""; }
      this.i++;
    }
    if (this.i == start) this.ok = false;
    return this.s.substring(start, this.i);
  }
}

// Parses a flat JSON object into key -> value text. Returns null when the
// text is not such an object, so a filter can refuse its configuration.
export function parseFlatJson(s: string): Map<string, string> | null {
  const m = new Map<string, string>();
  const sc = new Scanner(s);
  sc.expect(LBRACE);
  if (!sc.ok) return null;
  sc.skipSpace();
  if (sc.peek() == RBRACE) {
    sc.i++;
  } else {
    while (true) {
      const key = sc.str();
      sc.expect(COLON);
      if (!sc.ok) return null;
      sc.skipSpace();
      const value = sc.peek() == QUOTE ? sc.str() : sc.bare();
      if (!sc.ok) return null;
      m.set(key, value);
      sc.skipSpace();
      const c = sc.peek();
      sc.i++;
      if (c == RBRACE) break;
      if (c != COMMA) return null;
    }
  }
  sc.skipSpace();
  if (sc.i != s.length) return null; // trailing garbage
  return m;
}

export function field(m: Map<string, string>, key: string, fallback: string): string {
  return m.has(key) ? m.get(key) : fallback;
}

// "Server, X-Powered-By" -> ["server", "x-powered-by"]; header maps are
// lower-case on the host side, so names are compared in lower case.
export function headerList(s: string): string[] {
  const out = new Array<string>();
  const parts = s.split(",");
  for (let i = 0; i < parts.length; i++) {
    const name = parts[i].trim().toLowerCase();
    if (name.length > 0) out.push(name);
  }
  return out;
}
