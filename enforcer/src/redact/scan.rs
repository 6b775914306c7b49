//! The detectors: token formats, secret keys and flags, URLs, PEM blocks, and the byte
//! helpers they share. Each pushes the spans to replace; none allocates per byte.
use super::*;

pub(super) fn trim_ascii(b: &[u8]) -> &[u8] {
    let s = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let e = b.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(s, |p| p + 1);
    &b[s..e.max(s)]
}

pub(super) fn trim_spaces(b: &[u8]) -> &[u8] {
    let s = b.iter().position(|c| *c != b' ').unwrap_or(b.len());
    let e = b.iter().rposition(|c| *c != b' ').map_or(s, |p| p + 1);
    &b[s..e.max(s)]
}

pub(super) fn is_cont(b: u8) -> bool {
    b & 0xC0 == 0x80
}

pub(super) fn floor_boundary(b: &[u8], mut i: usize) -> usize {
    while i > 0 && i < b.len() && is_cont(b[i]) {
        i -= 1;
    }
    i.min(b.len())
}

pub(super) fn ceil_boundary(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && is_cont(b[i]) {
        i += 1;
    }
    i
}

pub(super) fn is_sep(c: u8) -> bool {
    c == 0 || c.is_ascii_whitespace()
}

/// The text as a shell would join it, for matching: quote characters and backslashes removed
/// (`"ghp_"'abc'` reads `ghp_abc`; a backslash-newline vanishes), every run of whitespace and
/// argument separators one space. Returns the skeleton and, per skeleton byte, its offset in
/// the text.
pub(super) fn skeleton(b: &[u8]) -> (Vec<u8>, Vec<usize>) {
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
pub(super) enum Set {
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

pub(super) fn in_set(c: u8, s: Set) -> bool {
    match s {
        Set::Upper => c.is_ascii_uppercase() || c.is_ascii_digit(),
        Set::Alnum => c.is_ascii_alphanumeric(),
        Set::AlnumUnderscore => c.is_ascii_alphanumeric() || c == b'_',
        Set::Url => c.is_ascii_alphanumeric() || c == b'_' || c == b'-',
        Set::AlnumDash => c.is_ascii_alphanumeric() || c == b'-',
    }
}

/// (prefix, body characters, shortest body).
pub(super) const FORMATS: &[(&[u8], Set, usize)] = &[
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

pub(super) fn run(b: &[u8], from: usize, s: Set) -> usize {
    b[from.min(b.len())..].iter().take_while(|c| in_set(**c, s)).count()
}

pub(super) fn formats(sk: &[u8], push: &mut dyn FnMut(usize, usize)) {
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
pub(super) fn jwt(sk: &[u8], i: usize) -> Option<usize> {
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
pub(super) fn value_end(b: &[u8], from: usize, query: bool, script: bool) -> usize {
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
pub(super) fn arg_kinds(b: &[u8], whole_is_script: bool) -> Vec<(usize, usize, bool)> {
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

pub(super) fn script_at(kinds: &[(usize, usize, bool)], pos: usize) -> bool {
    let i = kinds.partition_point(|k| k.1 < pos);
    kinds.get(i).is_some_and(|k| k.2)
}

/// Values not worth hiding: empty, or an unexpanded variable in a script (`$TOKEN`,
/// `${TOKEN}`, `$(cat f)`), or an absolute path.
pub(super) fn keep_value(v: &[u8]) -> bool {
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
pub(super) fn port_like(v: &[u8]) -> bool {
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

pub(super) fn push_value(b: &[u8], start: usize, end: usize, spans: &mut Vec<Span>) {
    if end > start && !keep_value(&b[start..end]) {
        spans.push(Span { start, end });
    }
}

/// `key=value`, `key: value`, `"key": "value"` with a secret-looking key; headers.
pub(super) fn keyed_values(b: &[u8], kinds: &[(usize, usize, bool)], spans: &mut Vec<Span>) {
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
pub(super) fn words(b: &[u8]) -> impl Iterator<Item = usize> + '_ {
    (0..b.len()).filter(move |&i| {
        !is_sep(b[i])
            && (i == 0
                || is_sep(b[i - 1])
                || (matches!(b[i - 1], b'"' | b'\'') && (i < 2 || is_sep(b[i - 2]))))
    })
}

/// `--password VALUE`, `-storepass VALUE`, `-pVALUE`, `-u user:VALUE`.
pub(super) fn flag_values(b: &[u8], kinds: &[(usize, usize, bool)], spans: &mut Vec<Span>) {
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
pub(super) fn urls(b: &[u8], spans: &mut Vec<Span>) {
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
pub(super) fn pem_blocks(b: &[u8], spans: &mut Vec<Span>) {
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

pub(super) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
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
