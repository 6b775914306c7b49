//! Redaction of credential-shaped values in command lines before they enter an event.
//!
//! A command line is attacker- and accident-prone: `tool "$(cat secret)"` puts a secret's
//! value into the argv of `tool`, and every event about `tool` would carry it to
//! `events.jsonl` and every sink. [`Redactor`] replaces such values with a keyed fingerprint,
//! `[redacted:<first 8 hex digits of HMAC-SHA256(key, value)>]`. With the host's fingerprint
//! key (`<state_dir>/fingerprint.key`) these 8 digits are the prefix of the 16-digit
//! `env_credentials` fingerprint of the same value, so a value seen in an environment and on a
//! command line can be correlated without being revealed.
//!
//! What is redacted:
//! - well-known token formats anywhere (AWS access key ids, GitHub, GitLab, Slack, npm, Stripe,
//!   PyPI, Google API keys, JWTs), also when split by shell quotes or backslashes
//!   (`"ghp_"'abc…'`);
//! - PEM private key blocks (the body; the BEGIN line stays);
//! - values after secret-looking flags and keys: `--password X`, `--token=X`, `-pX` (mysql
//!   style, when X looks random), `-u user:X`, `password=X`, `AWS_SECRET_ACCESS_KEY=X`,
//!   `"client_secret": "X"`, URL query parameters (`?token=X&…`);
//! - `Authorization:` / `Proxy-Authorization:` header values (the scheme word stays) and
//!   `Cookie:` values;
//! - URL userinfo passwords (`https://user:X@host`, and a random-looking user alone);
//! - every literal value registered with [`Redactor::with_literals`] (at least
//!   [`MIN_LITERAL_LEN`] bytes), found regardless of quoting and whitespace between words.
//!
//! Cost: one pass per detector over at most [`MAX_INPUT`] bytes (argv from the kernel is at
//! most 2 KiB); literal lookup is a 64 Ki-bit filter over 8-byte windows, so the work per
//! command line is linear in its length and independent of the number of literals.
use std::borrow::Cow;
use std::collections::HashMap;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Shortest literal secret value that is matched (shorter ones would redact ordinary words).
pub const MIN_LITERAL_LEN: usize = 8;
/// Longest input scanned; the rest of a longer command line is cut off and marked `...`.
pub const MAX_INPUT: usize = 64 * 1024;
/// Bounds on the registered literals (count, and bytes of one literal).
pub const MAX_LITERALS: usize = 8192;
pub const MAX_LITERAL_BYTES: usize = 64 * 1024;
/// At most this many literals share one 8-byte prefix (bounds the compare work per position).
const MAX_BUCKET: usize = 16;
/// When argv was truncated, the end of the last argument is checked for a cut-off literal
/// over this many bytes.
const TAIL_WINDOW: usize = 512;
/// Shortest cut-off literal prefix at the end of a truncated command line that is redacted.
const MIN_TAIL_PREFIX: usize = 4;

const FILTER_BITS: usize = 1 << 16;

/// The marker that replaces a value.
pub const MARKER_PREFIX: &str = "[redacted:";

pub struct Redactor {
    mac: Hmac<Sha256>,
    /// Literal values in skeleton form (see `skeleton`), longest first within a bucket.
    literals: Vec<Vec<u8>>,
    /// First 8 skeleton bytes -> literal indices.
    by_prefix8: HashMap<u64, Vec<u32>>,
    /// First 4 skeleton bytes -> literal indices (cut-off literals at a truncated end).
    by_prefix4: HashMap<u32, Vec<u32>>,
    /// Bit filter over hashed 8-byte prefixes: most positions are rejected here.
    filter: Vec<u64>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor").field("literals", &self.literals.len()).finish()
    }
}

fn hash8(w: u64) -> usize {
    (w.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 48) as usize
}

fn load8(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

fn load4(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

/// A span of the input to replace, in input byte offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Span {
    start: usize,
    end: usize,
}

impl Redactor {
    /// A redactor keyed with `key` (the host's fingerprint key; any length) and no literals.
    pub fn new(key: &[u8]) -> Redactor {
        Redactor {
            mac: <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length"),
            literals: Vec::new(),
            by_prefix8: HashMap::new(),
            by_prefix4: HashMap::new(),
            filter: vec![0; FILTER_BITS / 64],
        }
    }

    /// A redactor keyed with a fresh random key (fingerprints are then stable only for this
    /// redactor's lifetime).
    pub fn random() -> Redactor {
        let mut k = [0u8; 32];
        if getrandom::fill(&mut k).is_err() {
            // No randomness: fingerprints stay unlinkable across hosts only by the time.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            k[..16].copy_from_slice(&t.to_le_bytes());
        }
        Redactor::new(&k)
    }

    /// Registers known secret values (e.g. from [`literals_from_secret`]): each is redacted
    /// wherever it appears, also split by quotes or across arguments. Values shorter than
    /// [`MIN_LITERAL_LEN`] (after removing quotes and outer whitespace) are ignored.
    pub fn with_literals(mut self, literals: Vec<Vec<u8>>) -> Redactor {
        self.set_literals(literals);
        self
    }

    /// Replaces the registered literal values (a policy reload, a secret file that changed).
    pub fn set_literals(&mut self, literals: Vec<Vec<u8>>) {
        self.literals.clear();
        self.by_prefix8.clear();
        self.by_prefix4.clear();
        self.filter.iter_mut().for_each(|w| *w = 0);
        let mut skels: Vec<Vec<u8>> = literals
            .iter()
            .filter(|l| l.len() <= MAX_LITERAL_BYTES)
            .map(|l| {
                let (s, _) = skeleton(l);
                trim_spaces(&s).to_vec()
            })
            .filter(|s| s.len() >= MIN_LITERAL_LEN)
            .collect();
        skels.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        skels.dedup();
        skels.truncate(MAX_LITERALS);
        for (i, s) in skels.iter().enumerate() {
            let w8 = load8(s);
            let bucket = self.by_prefix8.entry(w8).or_default();
            if bucket.len() < MAX_BUCKET {
                bucket.push(i as u32);
            }
            let h = hash8(w8);
            self.filter[h / 64] |= 1 << (h % 64);
            let bucket4 = self.by_prefix4.entry(load4(s)).or_default();
            if bucket4.len() < MAX_BUCKET {
                bucket4.push(i as u32);
            }
        }
        self.literals = skels;
    }

    /// How many literal values are registered.
    pub fn literal_count(&self) -> usize {
        self.literals.len()
    }

    /// `[redacted:<8 hex>]` for a value.
    pub fn marker(&self, value: &[u8]) -> String {
        let mut mac = self.mac.clone();
        mac.update(value);
        format!("{MARKER_PREFIX}{}]", hex::encode(&mac.finalize().into_bytes()[..4]))
    }

    /// Redacts one string (a shell script, a single argument, a header line).
    pub fn redact<'a>(&self, s: &'a str) -> Cow<'a, str> {
        let b = s.as_bytes();
        let b = &b[..floor_boundary(b, b.len().min(MAX_INPUT))];
        let spans = self.find(b, false, true);
        if spans.is_empty() && b.len() == s.len() {
            return Cow::Borrowed(s);
        }
        let out = self.apply(b, &spans);
        Cow::Owned(
            String::from_utf8(out)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        )
    }

    /// Redacts an argv. `truncated`: the last argument was cut off (the kernel's 2 KiB bound),
    /// so a literal cut off at its end is redacted too. A value spanning several arguments
    /// (an unquoted `$(cat secret)` split into words) becomes one argument holding the marker.
    pub fn redact_argv(&self, argv: &[String], truncated: bool) -> Vec<String> {
        let total: usize = argv.iter().map(|a| a.len() + 1).sum();
        let mut truncated = truncated;
        let mut buf = Vec::with_capacity(total.min(MAX_INPUT + 1));
        for (i, a) in argv.iter().enumerate() {
            if i > 0 {
                buf.push(0);
            }
            let room = MAX_INPUT.saturating_sub(buf.len());
            if a.len() > room {
                buf.extend_from_slice(&a.as_bytes()[..floor_boundary(a.as_bytes(), room)]);
                truncated = true;
                break;
            }
            buf.extend_from_slice(a.as_bytes());
        }
        let spans = self.find(&buf, truncated, false);
        let cut = buf.len() + 1 < total;
        if spans.is_empty() && !cut {
            return argv.to_vec();
        }
        let out = self.apply(&buf, &spans);
        let mut args: Vec<String> = out
            .split(|c| *c == 0)
            .map(|a| {
                String::from_utf8(a.to_vec())
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
            })
            .collect();
        if cut {
            args.push("...".into());
        }
        args
    }

    /// Every span to redact, sorted and merged.
    fn find(&self, b: &[u8], truncated: bool, whole_is_script: bool) -> Vec<Span> {
        let mut spans = Vec::new();
        let (sk, map) = skeleton(b);
        let to_orig = |a: usize, e: usize| Span { start: map[a], end: map[e - 1] + 1 };
        formats(&sk, &mut |a, e| spans.push(to_orig(a, e)));
        if !self.literals.is_empty() {
            self.literal_matches(&sk, truncated, &mut |a, e| spans.push(to_orig(a, e)));
        }
        let kinds = arg_kinds(b, whole_is_script);
        keyed_values(b, &kinds, &mut spans);
        flag_values(b, &kinds, &mut spans);
        urls(b, &mut spans);
        pem_blocks(b, &mut spans);
        if spans.is_empty() {
            return spans;
        }
        for s in spans.iter_mut() {
            s.start = floor_boundary(b, s.start);
            s.end = ceil_boundary(b, s.end);
        }
        spans.retain(|s| s.end > s.start);
        spans.sort();
        let mut merged: Vec<Span> = Vec::with_capacity(spans.len());
        for s in spans {
            match merged.last_mut() {
                Some(m) if s.start <= m.end => m.end = m.end.max(s.end),
                _ => merged.push(s),
            }
        }
        merged
    }

    fn literal_matches(&self, sk: &[u8], truncated: bool, push: &mut dyn FnMut(usize, usize)) {
        if sk.len() >= 8 {
            for i in 0..=sk.len() - 8 {
                let w = load8(&sk[i..]);
                let h = hash8(w);
                if self.filter[h / 64] & (1 << (h % 64)) == 0 {
                    continue;
                }
                let Some(bucket) = self.by_prefix8.get(&w) else { continue };
                // Longest first: the first hit covers the others at this position.
                if let Some(l) = bucket
                    .iter()
                    .map(|&ix| &self.literals[ix as usize])
                    .find(|l| sk[i..].starts_with(l))
                {
                    push(i, i + l.len());
                }
            }
        }
        if truncated && sk.len() >= MIN_TAIL_PREFIX {
            // A literal cut off by the truncation: the end of the text is a literal's prefix.
            let from = sk.len().saturating_sub(TAIL_WINDOW);
            for i in from..=sk.len() - MIN_TAIL_PREFIX {
                let Some(bucket) = self.by_prefix4.get(&load4(&sk[i..])) else { continue };
                let tail = &sk[i..];
                if bucket.iter().any(|&ix| {
                    let l = &self.literals[ix as usize];
                    l.len() > tail.len() && l.starts_with(tail)
                }) {
                    push(i, sk.len());
                    break;
                }
            }
        }
    }

    fn apply(&self, b: &[u8], spans: &[Span]) -> Vec<u8> {
        let mut out = Vec::with_capacity(b.len() + spans.len() * 20);
        let mut at = 0;
        for s in spans {
            out.extend_from_slice(&b[at..s.start]);
            let (value, _) = skeleton(&b[s.start..s.end]);
            out.extend_from_slice(self.marker(trim_spaces(&value)).as_bytes());
            at = s.end;
        }
        out.extend_from_slice(&b[at..]);
        out
    }
}

/// Literal values worth registering from a watched secret file's contents: the whole content
/// (trimmed, as `$(cat file)` yields it), each line, and the value part of `key = value`,
/// `key: value` and JSON `"key": "value"` lines (as `$(grep …| cut …)` or `jq -r` yield them).
/// Comments, section headers and short pieces are left out.
pub fn literals_from_secret(content: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut push = |v: &[u8]| {
        let v = trim_ascii(v);
        if v.len() >= MIN_LITERAL_LEN && v.len() <= MAX_LITERAL_BYTES && out.len() < MAX_LITERALS {
            out.push(v.to_vec());
        }
    };
    push(content);
    for line in content.split(|c| *c == b'\n') {
        let line = trim_ascii(line);
        if line.is_empty()
            || line.starts_with(b"#")
            || line.starts_with(b";")
            || line.starts_with(b"//")
            || (line.starts_with(b"[") && line.ends_with(b"]"))
            || line.starts_with(b"-----")
        {
            continue;
        }
        push(line);
        let sep =
            line.iter().position(|c| *c == b'=').or_else(|| line.iter().position(|c| *c == b':'));
        if let Some(p) = sep {
            let mut v = trim_ascii(&line[p + 1..]);
            if let Some(x) = v.strip_suffix(b",") {
                v = trim_ascii(x);
            }
            for q in [b'"', b'\''] {
                if v.len() >= 2 && v[0] == q && v[v.len() - 1] == q {
                    v = &v[1..v.len() - 1];
                }
            }
            push(v);
        }
    }
    // JSON string values (`"key": "value"`), also on one line.
    let mut i = 0;
    while let Some(p) = find(&content[i..], b":") {
        let mut v = i + p + 1;
        while v < content.len() && content[v].is_ascii_whitespace() {
            v += 1;
        }
        i = v;
        if content.get(v) != Some(&b'"') {
            continue;
        }
        let mut e = v + 1;
        while e < content.len() && content[e] != b'"' {
            e += if content[e] == b'\\' { 2 } else { 1 };
        }
        let e = e.min(content.len());
        push(&content[v + 1..e]);
        i = e;
    }
    out.sort();
    out.dedup();
    out
}

mod scan;
#[cfg(test)]
mod tests;

use scan::*;
