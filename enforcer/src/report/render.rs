//! Census renderings: JSON (the `Census` record), Markdown (for a CI job summary) and
//! SARIF 2.1.0 (for code scanning; one result per credential).
use std::fmt::Write;

use serde_json::{Value, json};

use super::census::{Census, CredentialReport};

pub fn json(c: &Census) -> String {
    serde_json::to_string_pretty(c).expect("census serializes")
}

/// Attacker-controlled text (names, paths, job ids, hosts) as inert Markdown: the characters
/// Markdown (GFM) acts on backslash-escaped (so `|` cannot split a table cell, `` ` `` `*` `_`
/// `[` `]` `<` `>` `#` `!` `&` `~` `$` cannot format, link, open HTML or an entity, and `\`
/// cannot escape what follows), every control character, line or
/// paragraph separator shown as a visible `\u{..}` (so it cannot end a row, a heading or a
/// list item).
pub fn md_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if matches!(
            c,
            '\\' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '|' | '#' | '!' | '&' | '~' | '$'
        ) {
            out.push('\\');
            out.push(c);
        } else if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{85}') {
            out.push_str(&format!("\\\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// A name as a code span when that is safe (no backtick, pipe, backslash or control
/// character: inside a code span nothing can be escaped), else as escaped text.
pub fn md_code(s: &str) -> String {
    let plain = !s.is_empty()
        && !s.chars().any(|c| {
            matches!(c, '`' | '|' | '\\' | '\u{2028}' | '\u{2029}' | '\u{85}') || c.is_control()
        })
        && s.trim() == s;
    if plain { format!("`{s}`") } else { md_text(s) }
}

/// A fence longer than any backtick run in `body`, so the body cannot close it.
fn fence(body: &str) -> String {
    let mut longest = 0;
    let mut cur = 0;
    for c in body.chars() {
        cur = if c == '`' { cur + 1 } else { 0 };
        longest = longest.max(cur);
    }
    "`".repeat((longest + 1).max(3))
}

pub fn markdown(c: &Census) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Credential census\n");
    let _ = writeln!(
        out,
        "Generated {} from {} events{} on {}. {} credential(s), {} job(s).\n",
        c.generated_at,
        c.events_read,
        c.since.as_ref().map(|s| format!(" since {s}")).unwrap_or_default(),
        if c.hosts.is_empty() {
            "no host".to_string()
        } else {
            c.hosts.iter().map(|h| md_text(h)).collect::<Vec<_>>().join(", ")
        },
        c.credentials.len(),
        c.jobs.len()
    );
    if c.credentials.is_empty() {
        let _ = writeln!(out, "No credential use was recorded.");
        return out;
    }
    let _ = writeln!(
        out,
        "| credential | kind | jobs | executables | destinations | grant | first seen | last seen |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for cr in &c.credentials {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            md_code(&cr.name),
            md_text(&cr.kind),
            cr.jobs.len(),
            cr.executables.len(),
            cr.destinations.len(),
            if cr.covered_by_grant { "yes" } else { "**no**" },
            md_text(&cr.first_seen),
            md_text(&cr.last_seen)
        );
    }
    for cr in &c.credentials {
        let _ = writeln!(out, "\n## {}\n", md_code(&cr.name));
        if !cr.paths.is_empty() {
            let _ = writeln!(
                out,
                "- files: {}",
                cr.paths.iter().map(|p| md_code(p)).collect::<Vec<_>>().join(", ")
            );
        }
        if !cr.fingerprints.is_empty() {
            let _ = writeln!(
                out,
                "- value fingerprints: {}",
                cr.fingerprints.iter().map(|p| md_code(p)).collect::<Vec<_>>().join(", ")
            );
        }
        let jobs: Vec<String> = cr
            .jobs
            .iter()
            .map(|j| match &j.name {
                Some(n) => {
                    format!("{} ({}, {})", md_code(n), md_text(&j.id), md_text(&j.source))
                }
                None => format!("{} ({})", md_code(&j.id), md_text(&j.source)),
            })
            .collect();
        let _ = writeln!(out, "- jobs: {}", jobs.join(", "));
        let _ = writeln!(
            out,
            "- executables: {}",
            cr.executables.iter().map(|p| md_code(p)).collect::<Vec<_>>().join(", ")
        );
        let _ = writeln!(
            out,
            "- uses: {} ({} without a grant){}",
            cr.uses,
            cr.uses_without_grant,
            if cr.grant_intents.is_empty() {
                String::new()
            } else {
                format!(
                    "; covered by intents {}",
                    cr.grant_intents.iter().map(|i| md_code(i)).collect::<Vec<_>>().join(", ")
                )
            }
        );
        if cr.destinations.is_empty() {
            let _ = writeln!(out, "- destinations contacted afterwards: none");
        } else {
            let _ = writeln!(out, "- destinations contacted afterwards:");
            for d in &cr.destinations {
                let _ = writeln!(
                    out,
                    "  - {} ({}, {} connect(s))",
                    md_code(&d.destination),
                    md_text(&d.protocol),
                    d.connects
                );
            }
        }
        let mut toml = String::new();
        if let Some(s) = &cr.proposal.secret_toml {
            toml.push_str(s);
            toml.push('\n');
        }
        toml.push_str(&cr.proposal.intent_toml);
        let f = fence(&toml);
        let _ = writeln!(out, "\nProposed least-privilege policy:\n\n{f}toml\n{toml}{f}");
        let src = &cr.proposal.credential_source;
        let f = fence(&src.toml);
        let _ = writeln!(
            out,
            "\nCredential source replacing it ({}): {}\n\n{f}toml\n{}{f}",
            md_code(&src.kind),
            md_code(&src.usage),
            src.toml
        );
        if let Some(p) = &src.session_policy {
            let json = serde_json::to_string_pretty(p).unwrap_or_default();
            let f = fence(&json);
            let _ = writeln!(out, "\nSession policy:\n\n{f}json\n{json}\n{f}");
        }
    }
    out
}

const RULE_FILE: &str = "ENF001";
const RULE_ENV: &str = "ENF002";
const RULE_GRANTED: &str = "ENF003";

fn rules() -> Value {
    json!([
        {
            "id": RULE_FILE,
            "name": "BroadCredentialFileWithoutGrant",
            "shortDescription": { "text": "A credential file was used without a grant" },
            "fullDescription": { "text": "A long-lived credential file was read by CI job processes that held no enforcer grant for it. Replace the broad static credential with an intent scoped to the destinations the job actually uses." },
            "help": { "text": "Add the proposed [[intent]] stanza to the enforcer policy and have the job request a grant (`enforcer run --intent NAME -- CMD`).", "markdown": "Add the proposed `[[intent]]` stanza to the enforcer policy and have the job request a grant (`enforcer run --intent NAME -- CMD`)." },
            "defaultConfiguration": { "level": "error" },
            "properties": { "tags": ["security", "credentials", "least-privilege"], "security-severity": "7.5" }
        },
        {
            "id": RULE_ENV,
            "name": "StaticKeyInJobEnvironment",
            "shortDescription": { "text": "A static credential was carried in a job's environment" },
            "fullDescription": { "text": "A process started with a static credential in its environment variables (name and keyed fingerprint recorded, never the value). Environment keys are inherited by every child process and cannot be scoped or revoked." },
            "help": { "text": "Move the key into a file-backed secret and add the proposed [[secret]] and [[intent]] stanzas.", "markdown": "Move the key into a file-backed secret and add the proposed `[[secret]]` and `[[intent]]` stanzas." },
            "defaultConfiguration": { "level": "error" },
            "properties": { "tags": ["security", "credentials", "static-key"], "security-severity": "8.0" }
        },
        {
            "id": RULE_GRANTED,
            "name": "CredentialUsedUnderGrant",
            "shortDescription": { "text": "A credential was used under a grant" },
            "fullDescription": { "text": "Every recorded use of this credential was covered by an enforcer grant." },
            "help": { "text": "Nothing to do; the proposed intent shows the destinations actually used if the current one is broader." },
            "defaultConfiguration": { "level": "note" },
            "properties": { "tags": ["security", "credentials"] }
        }
    ])
}

fn file_uri(path: &str) -> String {
    let mut out = String::from("file://");
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn result(cr: &CredentialReport) -> Value {
    let (rule, index, level) = match (cr.kind.as_str(), cr.uses_without_grant) {
        ("env", _) => (RULE_ENV, 1, "error"),
        (_, 0) => (RULE_GRANTED, 2, "note"),
        _ => (RULE_FILE, 0, "error"),
    };
    let dests: Vec<&str> = cr.destinations.iter().map(|d| d.destination.as_str()).collect();
    let text = format!(
        "Credential '{}' ({}) was used {} time(s), {} without a grant, by {} job(s) and {} executable(s) [{}]; destinations contacted afterwards: {}. Proposed intent '{}' limits it to exactly these destinations with max_ttl {}.",
        cr.name,
        cr.kind,
        cr.uses,
        cr.uses_without_grant,
        cr.jobs.len(),
        cr.executables.len(),
        cr.executables.join(", "),
        if dests.is_empty() { "none".to_string() } else { dests.join(", ") },
        cr.proposal.intent_name,
        cr.proposal.max_ttl
    );
    // A file secret is located at its file; an env key at the first executable that carried it.
    let where_ =
        cr.paths.first().or_else(|| cr.executables.first()).cloned().unwrap_or_else(|| "/".into());
    let mut fix = String::new();
    if let Some(s) = &cr.proposal.secret_toml {
        fix.push_str(s);
        fix.push('\n');
    }
    fix.push_str(&cr.proposal.intent_toml);
    json!({
        "ruleId": rule,
        "ruleIndex": index,
        "level": level,
        "message": { "text": text },
        "locations": [{
            "physicalLocation": { "artifactLocation": { "uri": file_uri(&where_) } },
            "logicalLocations": cr.jobs.iter().map(|j| json!({ "name": j.name.clone().unwrap_or_else(|| j.id.clone()), "fullyQualifiedName": format!("{}:{}", j.source, j.id), "kind": "module" })).collect::<Vec<_>>()
        }],
        "partialFingerprints": { "enforcerCredential/v1": cr.name },
        "properties": {
            "credential": cr.name,
            "kind": cr.kind,
            "jobs": cr.jobs,
            "executables": cr.executables,
            "destinations": dests,
            "firstSeen": cr.first_seen,
            "lastSeen": cr.last_seen,
            "coveredByGrant": cr.covered_by_grant,
            "proposedPolicy": fix,
            "credentialSource": cr.proposal.credential_source
        }
    })
}

pub fn sarif(c: &Census) -> String {
    let doc = json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": { "driver": {
                "name": "enforcer",
                "fullName": "enforcer credential census",
                "version": env!("CARGO_PKG_VERSION"),
                "semanticVersion": env!("CARGO_PKG_VERSION"),
                "informationUri": "https://github.com/enforcer/enforcer",
                "rules": rules()
            }},
            "automationDetails": { "id": format!("enforcer/census/{}", c.hosts.join(",")) },
            "invocations": [{ "executionSuccessful": true, "endTimeUtc": c.generated_at }],
            "results": c.credentials.iter().map(result).collect::<Vec<_>>(),
            "properties": { "eventsRead": c.events_read, "hosts": c.hosts, "jobs": c.jobs }
        }]
    });
    serde_json::to_string_pretty(&doc).expect("sarif serializes")
}
