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

fn trim_ascii(b: &[u8]) -> &[u8] {
    let s = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let e = b.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(s, |p| p + 1);
    &b[s..e.max(s)]
}

fn trim_spaces(b: &[u8]) -> &[u8] {
    let s = b.iter().position(|c| *c != b' ').unwrap_or(b.len());
    let e = b.iter().rposition(|c| *c != b' ').map_or(s, |p| p + 1);
    &b[s..e.max(s)]
}

fn is_cont(b: u8) -> bool {
    b & 0xC0 == 0x80
}

fn floor_boundary(b: &[u8], mut i: usize) -> usize {
    while i > 0 && i < b.len() && is_cont(b[i]) {
        i -= 1;
    }
    i.min(b.len())
}

fn ceil_boundary(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && is_cont(b[i]) {
        i += 1;
    }
    i
}

fn is_sep(c: u8) -> bool {
    c == 0 || c.is_ascii_whitespace()
}

/// The text as a shell would join it, for matching: quote characters and backslashes removed
/// (`"ghp_"'abc'` reads `ghp_abc`; a backslash-newline vanishes), every run of whitespace and
/// argument separators one space. Returns the skeleton and, per skeleton byte, its offset in
/// the text.
fn skeleton(b: &[u8]) -> (Vec<u8>, Vec<usize>) {
    let mut sk = Vec::with_capacity(b.len());
    let mut map = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'"' | b'\'' => {}
            b'\\' => {
                if b.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            c if is_sep(c) => {
                if sk.last() != Some(&b' ') {
                    sk.push(b' ');
                    map.push(i);
                }
            }
            _ => {
                sk.push(c);
                map.push(i);
            }
        }
        i += 1;
    }
    (sk, map)
}

// ---------------------------------------------------------------------------------------------
// Token formats (on the skeleton).

#[derive(Clone, Copy)]
enum Set {
    /// A-Z 0-9
    Upper,
    /// A-Z a-z 0-9
    Alnum,
    /// A-Z a-z 0-9 _
    AlnumUnderscore,
    /// A-Z a-z 0-9 _ -
    Url,
    /// A-Z a-z 0-9 -
    AlnumDash,
}

fn in_set(c: u8, s: Set) -> bool {
    match s {
        Set::Upper => c.is_ascii_uppercase() || c.is_ascii_digit(),
        Set::Alnum => c.is_ascii_alphanumeric(),
        Set::AlnumUnderscore => c.is_ascii_alphanumeric() || c == b'_',
        Set::Url => c.is_ascii_alphanumeric() || c == b'_' || c == b'-',
        Set::AlnumDash => c.is_ascii_alphanumeric() || c == b'-',
    }
}

/// (prefix, body characters, shortest body).
const FORMATS: &[(&[u8], Set, usize)] = &[
    (b"AKIA", Set::Upper, 16),
    (b"ASIA", Set::Upper, 16),
    (b"ABIA", Set::Upper, 16),
    (b"ACCA", Set::Upper, 16),
    (b"AIza", Set::Url, 30),
    (b"ghp_", Set::Alnum, 20),
    (b"gho_", Set::Alnum, 20),
    (b"ghu_", Set::Alnum, 20),
    (b"ghs_", Set::Alnum, 20),
    (b"ghr_", Set::Alnum, 20),
    (b"github_pat_", Set::AlnumUnderscore, 20),
    (b"glpat-", Set::Url, 20),
    (b"glptt-", Set::Url, 20),
    (b"gldt-", Set::Url, 20),
    (b"xoxa-", Set::AlnumDash, 10),
    (b"xoxb-", Set::AlnumDash, 10),
    (b"xoxp-", Set::AlnumDash, 10),
    (b"xoxr-", Set::AlnumDash, 10),
    (b"xoxs-", Set::AlnumDash, 10),
    (b"xapp-", Set::AlnumDash, 10),
    (b"npm_", Set::Alnum, 30),
    (b"sk_live_", Set::Alnum, 16),
    (b"rk_live_", Set::Alnum, 16),
    (b"sk-ant-", Set::Url, 20),
    (b"pypi-AgE", Set::Url, 30),
    (b"hf_", Set::Alnum, 30),
];

fn run(b: &[u8], from: usize, s: Set) -> usize {
    b[from.min(b.len())..].iter().take_while(|c| in_set(**c, s)).count()
}

fn formats(sk: &[u8], push: &mut dyn FnMut(usize, usize)) {
    let mut i = 0;
    while i < sk.len() {
        let c = sk[i];
        if !matches!(c, b'A' | b'g' | b'x' | b'n' | b's' | b'r' | b'p' | b'h' | b'e') {
            i += 1;
            continue;
        }
        let mut end = None;
        if c == b'e' {
            end = jwt(sk, i);
        } else {
            for (prefix, set, min) in FORMATS {
                if prefix[0] == c && sk[i..].starts_with(prefix) {
                    let n = run(sk, i + prefix.len(), *set);
                    if n >= *min {
                        end = Some(i + prefix.len() + n);
                        break;
                    }
                }
            }
        }
        match end {
            Some(e) => {
                push(i, e);
                i = e;
            }
            None => i += 1,
        }
    }
}

/// `eyJ<header>.eyJ<payload>.<signature>` (signature may be empty: unsigned tokens).
fn jwt(sk: &[u8], i: usize) -> Option<usize> {
    if !sk[i..].starts_with(b"eyJ") {
        return None;
    }
    let h = run(sk, i, Set::Url);
    let p = i + h;
    if h < 10 || sk.get(p) != Some(&b'.') || !sk[p + 1..].starts_with(b"eyJ") {
        return None;
    }
    let pl = run(sk, p + 1, Set::Url);
    if pl < 10 {
        return None;
    }
    let mut e = p + 1 + pl;
    if sk.get(e) == Some(&b'.') {
        e += 1;
        e += sk[e..].iter().take_while(|c| in_set(**c, Set::Url) || **c == b'=').count();
    }
    Some(e)
}

// ---------------------------------------------------------------------------------------------
// Contextual values (on the text: quoting decides where a value ends).

/// Whether a flag or key name names a secret: `--password`, `client_secret`, `GITHUB_TOKEN`,
/// `x-api-key`, `-storepass`; not `--password-file`, `--token-url`, `tokenizer`.
pub fn is_secret_key(name: &[u8]) -> bool {
    // Normalized on the stack: no leading dashes, lowercase, `-` and `.` as `_`; and the
    // same without underscores (`compact`).
    let name = &name[name.iter().take_while(|c| **c == b'-').count()..];
    if name.is_empty() || name.len() > 64 {
        return false;
    }
    let mut nb = [0u8; 64];
    let mut cb = [0u8; 64];
    let mut cn = 0;
    for (i, c) in name.iter().enumerate() {
        let c = match c.to_ascii_lowercase() {
            b'-' | b'.' => b'_',
            c => c,
        };
        nb[i] = c;
        if c != b'_' {
            cb[cn] = c;
            cn += 1;
        }
    }
    let name = &nb[..name.len()];
    let compact = &cb[..cn];
    // Cheap gate: every secret name below holds one of these trigrams.
    if !compact
        .windows(3)
        .any(|w| matches!(w, b"pas" | b"pwd" | b"sec" | b"key" | b"tok" | b"aut" | b"cre"))
    {
        return false;
    }
    if name.starts_with(b"no_") || name == b"pwd" {
        return false;
    }
    const NOT: &[&[u8]] = &[
        b"_file",
        b"_path",
        b"_dir",
        b"_stdin",
        b"_env",
        b"_name",
        b"_id",
        b"_type",
        b"_url",
        b"_uri",
        b"_endpoint",
        b"_helper",
        b"_command",
        b"_cmd",
        b"_length",
        b"_len",
        b"_ttl",
        b"_expiry",
        b"_expires",
        b"_expiration",
        b"_mode",
        b"_policy",
        b"_prompt",
        b"_source",
        b"_store",
        b"_count",
        b"_version",
        b"_method",
        b"_header",
        b"_format",
        b"_kind",
        b"_field",
        b"_var",
        b"_reset",
    ];
    if NOT.iter().any(|s| name.ends_with(s)) {
        return false;
    }
    const ANYWHERE: &[&[u8]] = &[
        b"password",
        b"passwd",
        b"passphrase",
        b"secret",
        b"apikey",
        b"accesskey",
        b"privatekey",
        b"signingkey",
        b"masterkey",
        b"encryptionkey",
        b"credential",
        b"authtoken",
    ];
    if ANYWHERE.iter().any(|w| find(compact, w).is_some()) {
        return true;
    }
    if compact.ends_with(b"token") || compact.ends_with(b"tokens") {
        return true;
    }
    if compact.ends_with(b"pass") && !compact.ends_with(b"bypass") && !compact.ends_with(b"compass")
    {
        return true;
    }
    name.split(|c| *c == b'_').any(|p| matches!(p, b"pass" | b"pwd" | b"auth" | b"token"))
}

/// End of a value starting at `from`. A value that opens with a quote ends after the
/// matching quote. Otherwise quotes group and a backslash escapes, and the value ends at an
/// argument boundary, or, in a `script` (a shell command line, where a space separates words),
/// at unquoted whitespace. `query`: `&` and `#` also end it (a URL query parameter).
fn value_end(b: &[u8], from: usize, query: bool, script: bool) -> usize {
    let arg_end = b[from.min(b.len())..].iter().position(|c| *c == 0).map_or(b.len(), |p| from + p);
    if from < arg_end && matches!(b[from], b'"' | b'\'') {
        let q = b[from];
        return b[from + 1..arg_end].iter().position(|c| *c == q).map_or(arg_end, |p| from + p + 2);
    }
    let mut i = from;
    let mut q: Option<u8> = None;
    while i < arg_end {
        let c = b[i];
        match q {
            Some(qc) => {
                if c == qc {
                    q = None;
                }
            }
            None => {
                if (script && c.is_ascii_whitespace())
                    || (query && matches!(c, b'&' | b'#' | b'"' | b'\'' | b' ' | b'\n'))
                {
                    break;
                }
                if c == b'"' || c == b'\'' {
                    q = Some(c);
                } else if c == b'\\' && i + 1 < arg_end {
                    i += 1;
                }
            }
        }
        i += 1;
    }
    i.min(arg_end)
}

/// Per argument (start, end, is a script): an argument is read as a shell command line (a
/// space separates words) when it follows `-c`, or holds whitespace together with shell
/// syntax (newline, `;`, `|`, `&&`, `$(`, a backquote, quotes). Otherwise a value after a
/// secret key runs to the end of its argument: `"--client-secret=abc def"` is one value.
fn arg_kinds(b: &[u8], whole_is_script: bool) -> Vec<(usize, usize, bool)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut prev_dash_c = false;
    for (i, part) in b.split(|c| *c == 0).enumerate() {
        let _ = i;
        let end = start + part.len();
        let script = whole_is_script
            || prev_dash_c
            || (part.iter().any(|c| c.is_ascii_whitespace())
                && part.iter().any(|c| matches!(c, b'\n' | b';' | b'|' | b'`' | b'"' | b'\''))
                || find(part, b"&&").is_some()
                || find(part, b"$(").is_some());
        prev_dash_c = part == b"-c" || part == b"-lc" || part == b"-ec";
        out.push((start, end, script));
        start = end + 1;
    }
    out
}

fn script_at(kinds: &[(usize, usize, bool)], pos: usize) -> bool {
    let i = kinds.partition_point(|k| k.1 < pos);
    kinds.get(i).is_some_and(|k| k.2)
}

/// Values not worth hiding: empty, or an unexpanded variable in a script (`$TOKEN`,
/// `${TOKEN}`, `$(cat f)`), or an absolute path.
fn keep_value(v: &[u8]) -> bool {
    let v: Vec<u8> = v.iter().copied().filter(|c| !matches!(c, b'"' | b'\'')).collect();
    if v.is_empty() {
        return true;
    }
    if v[0] == b'$' {
        let rest = &v[1..];
        if rest.starts_with(b"{") || rest.starts_with(b"(") {
            return true;
        }
        if !rest.is_empty()
            && rest.iter().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_')
        {
            return true;
        }
    }
    v[0] == b'/' && v.iter().filter(|c| **c == b'/').count() >= 2 && !v.contains(&b':')
}

/// A port or port mapping (`8080`, `8080:80/tcp`, `127.0.0.1:53:53/udp`), for `-p`.
fn port_like(v: &[u8]) -> bool {
    let v = [&b"/tcp"[..], b"/udp", b"/sctp"].iter().find_map(|s| v.strip_suffix(*s)).unwrap_or(v);
    v.iter().all(|c| c.is_ascii_digit() || matches!(c, b'.' | b':' | b'-' | b'[' | b']'))
}

/// Looks machine-generated rather than a word: mixed character classes, enough distinct
/// characters.
pub fn looks_random(v: &[u8]) -> bool {
    if v.len() < 8 {
        return false;
    }
    let (mut lo, mut up, mut dig, mut sym) = (false, false, false, false);
    for &c in v {
        match c {
            b'a'..=b'z' => lo = true,
            b'A'..=b'Z' => up = true,
            b'0'..=b'9' => dig = true,
            _ => sym = true,
        }
    }
    let classes = [lo, up, dig, sym].iter().filter(|x| **x).count();
    let mut seen = [false; 256];
    let distinct = v.iter().filter(|c| !std::mem::replace(&mut seen[**c as usize], true)).count();
    distinct * 3 >= v.len().min(48)
        && (classes >= 3 || (classes == 2 && (lo || up) && dig && v.len() >= 16))
}

fn push_value(b: &[u8], start: usize, end: usize, spans: &mut Vec<Span>) {
    if end > start && !keep_value(&b[start..end]) {
        spans.push(Span { start, end });
    }
}

/// `key=value`, `key: value`, `"key": "value"` with a secret-looking key; headers.
fn keyed_values(b: &[u8], kinds: &[(usize, usize, bool)], spans: &mut Vec<Span>) {
    for i in 0..b.len() {
        let sep = b[i];
        if sep != b'=' && sep != b':' {
            continue;
        }
        // The key, possibly quoted (JSON).
        let mut kend = i;
        let mut quoted = false;
        if sep == b':' && i > 0 && matches!(b[i - 1], b'"' | b'\'') {
            kend = i - 1;
            quoted = true;
        }
        let mut k = kend;
        while k > 0 && (b[k - 1].is_ascii_alphanumeric() || matches!(b[k - 1], b'_' | b'-' | b'.'))
        {
            k -= 1;
        }
        if k == kend || kend - k > 64 {
            continue;
        }
        let key = &b[k..kend];
        let before =
            if quoted { k.checked_sub(1).and_then(|p| p.checked_sub(1)) } else { k.checked_sub(1) };
        let query = before.is_some_and(|p| matches!(b[p], b'?' | b'&' | b';'));
        let mut lower_buf = [0u8; 64];
        let lower = &mut lower_buf[..key.len()];
        lower.copy_from_slice(key);
        lower.make_ascii_lowercase();
        let lower = &*lower;
        let mut v = i + 1;
        if sep == b':' {
            while v < b.len() && matches!(b[v], b' ' | b'\t') {
                v += 1;
            }
        }
        if sep == b':'
            && matches!(
                lower,
                b"authorization" | b"proxy-authorization" | b"cookie" | b"set-cookie"
            )
        {
            let mut e = v;
            while e < b.len() && !matches!(b[e], 0 | b'\r' | b'\n' | b'"' | b'\'') {
                e += 1;
            }
            let mut s = v;
            if lower.ends_with(b"authorization") {
                // Keep the scheme ("Bearer", "Basic", "token") when a credential follows it.
                let w = b[v..e].iter().take_while(|c| c.is_ascii_alphabetic()).count();
                if w > 0 && w <= 24 && v + w < e && b[v + w] == b' ' {
                    s = v + w + 1;
                    while s < e && b[s] == b' ' {
                        s += 1;
                    }
                }
            }
            if e > s {
                spans.push(Span { start: s, end: e });
            }
            continue;
        }
        let userpass = matches!(lower, b"--user" | b"-u" | b"user");
        if !userpass && !is_secret_key(key) {
            continue;
        }
        if sep == b':' && (userpass || (!quoted && v == i + 1 && !query && key.len() < 5)) {
            // `pass:x` without a space or quotes reads as host:port or user:pass; `user:x`
            // is left to URLs and `-u`.
            continue;
        }
        let e = value_end(b, v, query, script_at(kinds, v));
        if userpass {
            if let Some(c) = b[v..e].iter().position(|c| *c == b':') {
                push_value(b, v + c + 1, e, spans);
            }
            continue;
        }
        push_value(b, v, e, spans);
    }
}

/// Start offsets of the words of the text (after whitespace, argument boundaries, or an
/// opening quote at a word start).
fn words(b: &[u8]) -> impl Iterator<Item = usize> + '_ {
    (0..b.len()).filter(move |&i| {
        !is_sep(b[i])
            && (i == 0
                || is_sep(b[i - 1])
                || (matches!(b[i - 1], b'"' | b'\'') && (i < 2 || is_sep(b[i - 2]))))
    })
}

/// `--password VALUE`, `-storepass VALUE`, `-pVALUE`, `-u user:VALUE`.
fn flag_values(b: &[u8], kinds: &[(usize, usize, bool)], spans: &mut Vec<Span>) {
    for w in words(b) {
        if b[w] != b'-' {
            continue;
        }
        let mut e = w;
        while e < b.len() && (b[e].is_ascii_alphanumeric() || matches!(b[e], b'-' | b'_')) {
            e += 1;
        }
        let name = &b[w..e];
        let dashes = name.iter().take_while(|c| **c == b'-').count();
        if dashes == 1 && name.len() > 2 && name[1] == b'p' && !is_secret_key(name) {
            // mysql style -pVALUE: only what looks like a password (not -pthread, -print0).
            let ve = value_end(b, w + 2, false, script_at(kinds, w));
            if looks_random(&b[w + 2..ve]) && !port_like(&b[w + 2..ve]) {
                push_value(b, w + 2, ve, spans);
            }
            continue;
        }
        let mut n = e;
        if n < b.len() && matches!(b[n], b'"' | b'\'') {
            n += 1;
        }
        if n < b.len() && !is_sep(b[n]) {
            continue; // `--password=x` is a keyed value
        }
        if n == b.len() {
            continue;
        }
        let mut v = n;
        while v < b.len() && is_sep(b[v]) {
            v += 1;
        }
        if v >= b.len() {
            continue;
        }
        let ve = value_end(b, v, false, script_at(kinds, v));
        let value = &b[v..ve];
        match name {
            b"-p" if looks_random(value) && !port_like(value) => push_value(b, v, ve, spans),
            b"-u" | b"--user" => {
                if let Some(c) = value.iter().position(|c| *c == b':') {
                    push_value(b, v + c + 1, ve, spans);
                }
            }
            _ if dashes >= 1
                && name.len() > dashes
                && name != b"-p"
                && is_secret_key(name)
                && !value.starts_with(b"--") =>
            {
                push_value(b, v, ve, spans)
            }
            _ => {}
        }
    }
}

/// `scheme://user:PASSWORD@host`, `scheme://TOKEN@host` (a random-looking user alone).
fn urls(b: &[u8], spans: &mut Vec<Span>) {
    let mut from = 0;
    while let Some(p) = find(&b[from..], b"://") {
        let start = from + p + 3;
        let mut end = start;
        while end < b.len()
            && !is_sep(b[end])
            && !matches!(b[end], b'/' | b'?' | b'#' | b'"' | b'\'' | b'`' | b'<' | b'>')
        {
            end += 1;
        }
        if let Some(at) = b[start..end].iter().rposition(|c| *c == b'@') {
            let ui = &b[start..start + at];
            match ui.iter().position(|c| *c == b':') {
                Some(c) => push_value(b, start + c + 1, start + at, spans),
                None if looks_random(ui) || ui.len() >= 24 => {
                    push_value(b, start, start + at, spans)
                }
                None => {}
            }
        }
        from = end.max(start);
    }
}

/// The body of `-----BEGIN … PRIVATE KEY-----` blocks, to the END line or the argument's end.
fn pem_blocks(b: &[u8], spans: &mut Vec<Span>) {
    let mut from = 0;
    while let Some(p) = find(&b[from..], b"-----BEGIN ") {
        let h = from + p + 11;
        let Some(he) = find(&b[h..], b"-----").map(|x| h + x) else { break };
        let label = &b[h..he];
        from = he + 5;
        if he - h > 64 || find(label, b"PRIVATE KEY").is_none() {
            continue;
        }
        let body = he + 5;
        let arg_end = b[body..].iter().position(|c| *c == 0).map_or(b.len(), |x| body + x);
        let end = find(&b[body..arg_end], b"-----END ").map_or(arg_end, |x| body + x);
        if end > body {
            spans.push(Span { start: body, end });
        }
        from = end.max(body);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        match hay[i..hay.len() - needle.len() + 1].iter().position(|c| *c == first) {
            Some(p) => {
                i += p;
                if &hay[i..i + needle.len()] == needle {
                    return Some(i);
                }
                i += 1;
            }
            None => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"test-key-0123456789abcdef0123456";
    const GHP: &str = "ghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A";

    fn r() -> Redactor {
        Redactor::new(KEY)
    }

    fn red(s: &str) -> String {
        r().redact(s).into_owned()
    }

    fn argv(a: &[&str]) -> Vec<String> {
        r().redact_argv(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>(), false)
    }

    fn fp(v: &str) -> String {
        r().marker(v.as_bytes())
    }

    #[track_caller]
    fn gone(out: &str, secret: &str) {
        assert!(!out.contains(secret), "{secret:?} still in {out:?}");
        assert!(out.contains(MARKER_PREFIX), "no marker in {out:?}");
    }

    #[track_caller]
    fn same(s: &str) {
        assert_eq!(red(s), s);
    }

    #[test]
    fn marker_is_the_prefix_of_the_env_fingerprint() {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(KEY).unwrap();
        mac.update(b"hunter2hunter2");
        let env_fp = hex::encode(&mac.finalize().into_bytes()[..8]);
        assert_eq!(fp("hunter2hunter2"), format!("[redacted:{}]", &env_fp[..8]));
        // Keyed: another key, another fingerprint.
        assert_ne!(Redactor::new(b"other").marker(b"hunter2hunter2"), fp("hunter2hunter2"));
    }

    #[test]
    fn ordinary_command_lines_are_untouched() {
        for s in [
            "cat /root/.aws/credentials",
            "curl -s -m 5 http://127.0.0.1:8080/path?x=1&y=2",
            "python3 -c \"import sys; open(sys.argv[1]).read()\" /tmp/s \"two words\"",
            "ssh -p 22 git@github.com",
            "git clone ssh://git@github.com/org/repo.git",
            "mkdir -p build-output-directory",
            "gcc -pthread -pedantic -O2 main.c",
            "find . -print0",
            "docker run -p 8080:80/tcp image",
            "sort --key=2 file",
            "docker login --password-stdin -u ci",
            "tool --token-file /run/secrets/token",
            "env PWD=/home/user/build make",
            "echo password",
            "curl https://example.com/a:b@c",
            "kubectl --token \"$KUBE_TOKEN\" get pods",
            "sh -c 'deploy --password ${DEPLOY_PASSWORD}'",
            "tokenizer=bert-base run",
            "",
            "--token",
        ] {
            same(s);
        }
    }

    #[test]
    fn token_formats() {
        let aws = "AKIAIOSFODNN7EXAMPLE";
        for (line, secret) in [
            (format!("aws --key {aws} s3 ls"), aws.to_string()),
            ("x ASIAY34FZKBOKMUTVV7A".to_string(), "ASIAY34FZKBOKMUTVV7A".into()),
            (format!("git push https://{GHP}@github.com/o/r"), GHP.into()),
            (
                "gh --with github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz".into(),
                "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz".into(),
            ),
            ("x glpat-xxxxxxxxxxxxxxxxxxxx1".into(), "glpat-xxxxxxxxxxxxxxxxxxxx1".into()),
            ("slack xoxb-1234567890-abcdefghij".into(), "xoxb-1234567890-abcdefghij".into()),
            (
                "maps AIzaSyA-1234567890abcdefghijklmnopqrstu".into(),
                "AIzaSyA-1234567890abcdefghijklmnopqrstu".into(),
            ),
            (
                "npm_abcdefghijABCDEFGHIJ0123456789abcdef publish".into(),
                "npm_abcdefghijABCDEFGHIJ0123456789abcdef".into(),
            ),
        ] {
            let out = red(&line);
            gone(&out, &secret);
        }
        let out = red(&format!("curl {GHP}x"));
        assert_eq!(out, format!("curl {}", fp(&format!("{GHP}x"))));
    }

    #[test]
    fn jwt_whole_token() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        let out = red(&format!("curl -d token={jwt}"));
        gone(&out, "eyJzdWIi");
        gone(&out, "dozjgNry");
        same("echo eyJhbGciOiJIUzI1NiJ9");
    }

    #[test]
    fn pem_block_body() {
        let key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\nAAAAAAABAAAAMwAAAAtzc2gtZW\n-----END OPENSSH PRIVATE KEY-----";
        let out = argv(&["ssh-add", key, "next"]);
        assert!(out[1].starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"), "{out:?}");
        assert!(out[1].ends_with("-----END OPENSSH PRIVATE KEY-----"), "{out:?}");
        gone(&out[1], "b3BlbnNzaC1");
        assert_eq!(out[2], "next");
        // Cut off before END: redacted to the end of the argument, nothing beyond.
        let out = argv(&["x", "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7", "y"]);
        gone(&out[1], "MIIEow");
        assert_eq!(out[2], "y");
        same("-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----");
    }

    #[test]
    fn flags_in_every_form() {
        assert_eq!(red("tool --token=s3cr3tValue"), format!("tool --token={}", fp("s3cr3tValue")));
        assert_eq!(
            argv(&["tool", "--password", "hunter2"]),
            ["tool", "--password", &fp("hunter2")]
        );
        assert_eq!(
            red("tool --password hunter2 x"),
            format!("tool --password {} x", fp("hunter2"))
        );
        assert_eq!(argv(&["mysql", "-pHunter2!x", "db"])[1], format!("-p{}", fp("Hunter2!x")));
        assert_eq!(argv(&["mysql", "-p", "Xk9#mQ2$vL", "db"])[2], fp("Xk9#mQ2$vL"));
        assert_eq!(argv(&["x", "--api-key", "abc"])[2], fp("abc"));
        assert_eq!(argv(&["keytool", "-storepass", "changeit"])[2], fp("changeit"));
        assert_eq!(
            argv(&["x", "--client-secret=abc def"])[1],
            format!("--client-secret={}", fp("abc def"))
        );
        assert_eq!(
            argv(&["curl", "-u", "alice:s3cret", "h"])[2],
            format!("alice:{}", fp("s3cret"))
        );
        assert_eq!(
            argv(&["curl", "--user=alice:s3cret"])[1],
            format!("--user=alice:{}", fp("s3cret"))
        );
        // Quoted values in a script: the whole shell word, quotes included, goes.
        assert_eq!(
            red("sh -c 'tool --password \"a b c\" next'"),
            format!("sh -c 'tool --password {} next'", fp("a b c"))
        );
        // One argument (no shell syntax): the value is the rest of the argument.
        assert_eq!(argv(&["x", "--password=a b"])[1], format!("--password={}", fp("a b")));
        // After -c, a script: the value is one shell word.
        assert_eq!(
            argv(&["sh", "-c", "PASSWORD=abc123 make all"])[2],
            format!("PASSWORD={} make all", fp("abc123"))
        );
        // A newline separates like a space.
        gone(&red("x --token\nVALUE_1234 y"), "VALUE_1234");
    }

    #[test]
    fn keyed_values() {
        assert_eq!(
            argv(&["env", "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws"])
                [1],
            format!("AWS_SECRET_ACCESS_KEY={}", fp("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"))
        );
        gone(&red("aws configure set aws_secret_access_key=abcdEFGH1234"), "abcdEFGH1234");
        gone(&red("GITHUB_TOKEN=abc123xyz ./deploy"), "abc123xyz");
        assert_eq!(
            red("curl https://h/api?token=abc123&page=2"),
            format!("curl https://h/api?token={}&page=2", fp("abc123"))
        );
        assert_eq!(
            red(r#"curl -d '{"client_secret": "x y z", "id": 1}'"#),
            format!(r#"curl -d '{{"client_secret": {}, "id": 1}}'"#, fp("x y z"))
        );
        gone(&red("mount -o user=bob,password=pa55w0rd //srv/share"), "pa55w0rd");
        gone(&red("echo 'password: hunter22'"), "hunter22");
    }

    #[test]
    fn headers_keep_the_scheme() {
        assert_eq!(
            argv(&["curl", "-H", "Authorization: Bearer abc.def.ghi", "https://x"])[2],
            format!("Authorization: Bearer {}", fp("abc.def.ghi"))
        );
        assert_eq!(
            red("sh -c 'curl -H \"proxy-authorization: Basic dXNlcjpwYXNz\" https://x'"),
            format!(
                "sh -c 'curl -H \"proxy-authorization: Basic {}\" https://x'",
                fp("dXNlcjpwYXNz")
            )
        );
        gone(&red("curl -H 'Authorization:tok123456'"), "tok123456");
        gone(&red("curl -H 'Cookie: session=abcdef123'"), "abcdef123");
        gone(&red("curl -H 'X-Api-Key: k3yk3yk3y'"), "k3yk3yk3y");
        gone(&red("curl -H 'PRIVATE-TOKEN: zzzz9999'"), "zzzz9999");
    }

    #[test]
    fn url_userinfo() {
        assert_eq!(
            red("git clone https://user:p%40ss@host/repo"),
            format!("git clone https://user:{}@host/repo", fp("p%40ss"))
        );
        gone(
            &red("pip install --index-url https://__token__:pypi1234xyz@pypi.org/simple x"),
            "pypi1234xyz",
        );
        gone(&red("git clone https://Zx81kQ2mP0aL9sV3@gitlab.example/r"), "Zx81kQ2mP0aL9sV3");
        same("git clone https://git@github.com/o/r");
        same("psql postgres://app@db:5432/x");
    }

    #[test]
    fn split_by_quotes_and_backslashes() {
        let (a, b) = GHP.split_at(10);
        for script in [
            format!("echo \"{a}\"'{b}'"),
            format!("echo {a}\"\"{b}"),
            format!("echo {a}\\\n{b}"),
            format!("echo '{a}''{b}' more"),
        ] {
            let out = red(&script);
            assert!(!out.contains(b), "{out:?}");
            assert!(out.contains(&fp(GHP)), "{out:?} lacks the fingerprint of the joined token");
            assert!(out.starts_with("echo "), "{out:?}");
        }
    }

    #[test]
    fn unicode_around_and_inside_values() {
        let out = red(&format!("écho «{GHP}» ✓ --password=pässwörd€ 日本"));
        gone(&out, GHP);
        assert!(!out.contains("pässwörd"), "{out}");
        assert!(out.starts_with("écho «") && out.ends_with(" 日本"), "{out}");
        same("naïve --verbose ✓ 🦀 ünïcödé");
    }

    #[test]
    fn literals_anywhere() {
        let secret = "correct horse battery staple";
        let rd = r().with_literals(vec![secret.into(), b"short".to_vec(), b"exactly8".to_vec()]);
        assert_eq!(rd.literal_count(), 2);
        let a = |v: &[&str]| {
            rd.redact_argv(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>(), false)
        };
        // Quoted: one argument.
        let out = a(&["tool", secret, "--flag"]);
        assert_eq!(out, ["tool", &rd.marker(secret.as_bytes()), "--flag"]);
        // Unquoted $(cat secret): split into words, joined again into one marker.
        let out = a(&["tool", "correct", "horse", "battery", "staple", "--flag"]);
        assert_eq!(out, ["tool", &rd.marker(secret.as_bytes()), "--flag"]);
        // Inside a script, split by quotes.
        let out = rd.redact("sh -c 'tool \"correct hor\"\"se battery staple\" x'").into_owned();
        assert!(!out.contains("battery"), "{out}");
        assert!(out.contains(&rd.marker(secret.as_bytes())), "{out}");
        // Short literals are not matched; 8 bytes are.
        assert_eq!(rd.redact("short exactly8 x"), format!("short {} x", rd.marker(b"exactly8")));
    }

    #[test]
    fn truncated_literal_at_the_end() {
        let secret = "Z9x8C7v6B5n4M3a2S1d0";
        let rd = r().with_literals(vec![secret.into()]);
        let v: Vec<String> = vec!["tool".into(), format!("--x={}", &secret[..9])];
        let out = rd.redact_argv(&v, true);
        assert!(!out.join(" ").contains(&secret[..9]), "{out:?}");
        // Not truncated: a prefix is just text.
        assert_eq!(rd.redact_argv(&v, false), v);
    }

    #[test]
    fn literals_from_secret_files() {
        let creds = b"[default]\naws_access_key_id = AKIAEXAMPLEKEYID0000\naws_secret_access_key=wJalrXUtnFEMIK7MDENG\n# comment line here\n";
        let l = literals_from_secret(creds);
        for want in [&b"AKIAEXAMPLEKEYID0000"[..], b"wJalrXUtnFEMIK7MDENG"] {
            assert!(l.iter().any(|x| x == want), "{:?}", l);
        }
        assert!(!l.iter().any(|x| x == b"[default]" || x.starts_with(b"# ")));
        let json = br#"{"type": "service_account", "private_key_id": "0123456789abcdef"}"#;
        assert!(literals_from_secret(json).iter().any(|x| x == b"0123456789abcdef"));
        let rd = r().with_literals(literals_from_secret(b"  tok-Abc123-xyz\n\n"));
        gone(&rd.redact("deploy tok-Abc123-xyz now"), "tok-Abc123-xyz");
    }

    #[test]
    fn long_input_is_bounded() {
        let big = "a ".repeat(MAX_INPUT);
        let out = r().redact_argv(&[big.clone(), "tail".into()], false);
        assert!(out.last().unwrap() == "...");
        assert!(out.iter().map(|a| a.len()).sum::<usize>() <= MAX_INPUT + 8);
        assert!(r().redact(&big).len() <= MAX_INPUT);
    }

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_inputs_never_panic_and_never_show_a_literal() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        const ALPHA: &[&str] = &[
            "a",
            "Z",
            "0",
            "=",
            ":",
            "-",
            "--",
            "\"",
            "'",
            "\\",
            " ",
            "\n",
            "\0",
            "/",
            "@",
            "?",
            "&",
            "é",
            "日",
            "🦀",
            "ghp_",
            "eyJ",
            "AKIA",
            "-----BEGIN ",
            "PRIVATE KEY-----",
            "password",
            "token=",
            "://",
            "Authorization: ",
            "-p",
            "$",
            "{",
            "}",
            ",",
        ];
        let literals: Vec<String> = (0..20)
            .map(|i| {
                let n = 8 + rng.below(30);
                (0..n).map(|_| ALPHA[rng.below(ALPHA.len())]).collect::<String>() + &format!("{i}")
            })
            .filter(|l| {
                let (s, _) = skeleton(l.as_bytes());
                trim_spaces(&s).len() >= MIN_LITERAL_LEN
            })
            .collect();
        let rd = r().with_literals(literals.iter().map(|l| l.as_bytes().to_vec()).collect());
        for round in 0..4000 {
            let mut s = String::new();
            let n = rng.below(200);
            for _ in 0..n {
                if rng.below(40) == 0 {
                    // A literal, sometimes with quotes sprinkled in (as a script would).
                    let l = &literals[rng.below(literals.len())];
                    for c in l.chars() {
                        s.push(c);
                        if rng.below(8) == 0 {
                            s.push(['"', '\''][rng.below(2)]);
                        }
                    }
                } else {
                    s.push_str(ALPHA[rng.below(ALPHA.len())]);
                }
            }
            // Random bytes too, made valid as the kernel's argv is made valid.
            let raw: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
            s.push_str(&String::from_utf8_lossy(&raw));
            let args: Vec<String> = s.split('\0').map(str::to_string).collect();
            let out = rd.redact_argv(&args, round % 3 == 0);
            let joined = out.join(" ");
            let skel_out = skeleton(joined.as_bytes()).0;
            for l in &literals {
                let (ls, _) = skeleton(l.as_bytes());
                let ls = trim_spaces(&ls);
                assert!(
                    find(&skel_out, ls).is_none(),
                    "literal {l:?} survives in {joined:?} (from {s:?})"
                );
            }
            let one = rd.redact(&s);
            assert!(one.len() <= s.len() * 20 + 64);
        }
    }

    #[test]
    fn cost_per_command_line() {
        // A realistic 2 KiB argv with no secret (the common case), one with several, and
        // the worst case for the literal filter; printed for the report, bounded loosely.
        let lits: Vec<Vec<u8>> =
            (0..1000).map(|i| format!("literal-secret-{i:06}-xyz").into_bytes()).collect();
        let rd = r().with_literals(lits);
        let plain: Vec<String> = (0..150).map(|i| format!("--opt{i}=v{i}")).collect();
        let mut secrets = plain.clone();
        secrets[10] = GHP.into();
        secrets[50] = "--password=hunter2".into();
        secrets[90] = "literal-secret-000500-xyz".into();
        let worst: Vec<String> = vec!["literal-".repeat(256)];
        for (name, v) in [("plain", &plain), ("secrets", &secrets), ("prefix-flood", &worst)] {
            let len: usize = v.iter().map(|a| a.len() + 1).sum();
            let n = 2000;
            let t = std::time::Instant::now();
            for _ in 0..n {
                std::hint::black_box(rd.redact_argv(std::hint::black_box(v), false));
            }
            let per = t.elapsed() / n;
            eprintln!("redact_argv {name}: {len} bytes, {per:?} per command line");
            assert!(per < std::time::Duration::from_millis(2), "{name}: {per:?}");
        }
    }
}
