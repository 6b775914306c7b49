//! OCSF 1.3 rendering of `enforcer.event/v1`, for SIEMs that normalise on OCSF.
//!
//! - a use that was allowed: File System Activity (1001, Open) or Network Activity (4001, Open)
//! - a violation (verdict != allowed): Detection Finding (2004) carrying the use as evidence,
//!   `finding_info.attacks` from `mitre`, and the action as `disposition_id`
//! - grant lifecycle: User Access Management (3005, Assign/Revoke Privileges)
//! - the agent itself: Application Lifecycle (6002)
//!
//! Everything OCSF has no attribute for (verdict, decision path, grant, cgroup) is kept under
//! `unmapped` so nothing in the native event is lost in translation.
use serde_json::{Value, json};

use crate::event::Event;

pub const OCSF_VERSION: &str = "1.3.0";
pub const VENDOR: &str = "enforcer project";

pub fn severity_id(s: &str) -> u8 {
    match s {
        "info" => 1,
        "low" => 2,
        "medium" => 3,
        "high" => 4,
        "critical" => 5,
        _ => 0,
    }
}

fn severity_label(id: u8) -> &'static str {
    ["Unknown", "Informational", "Low", "Medium", "High", "Critical"]
        .get(id as usize)
        .copied()
        .unwrap_or("Unknown")
}

/// OCSF disposition of an action: what the control did about the use.
/// `killed` ends the process that used the credential: the closest OCSF term is Access Revoked.
pub fn disposition(action: &str) -> (u8, &'static str) {
    match action {
        "allowed" => (1, "Allowed"),
        "denied" => (2, "Blocked"),
        "alerted" => (19, "Alert"),
        "killed" => (24, "Access Revoked"),
        _ => (0, "Unknown"),
    }
}

/// ATT&CK technique names and the tactic each is reported under here.
fn technique(id: &str) -> Value {
    let (name, tactic_uid, tactic) = match id {
        "T1552" => ("Unsecured Credentials", "TA0006", "Credential Access"),
        "T1552.001" => {
            ("Unsecured Credentials: Credentials In Files", "TA0006", "Credential Access")
        }
        "T1552.004" => ("Unsecured Credentials: Private Keys", "TA0006", "Credential Access"),
        "T1552.005" => {
            ("Unsecured Credentials: Cloud Instance Metadata API", "TA0006", "Credential Access")
        }
        "T1078" => ("Valid Accounts", "TA0005", "Defense Evasion"),
        "T1078.004" => ("Valid Accounts: Cloud Accounts", "TA0005", "Defense Evasion"),
        _ => ("", "", ""),
    };
    let mut t = json!({ "technique": { "uid": id } });
    if !name.is_empty() {
        t["technique"]["name"] = name.into();
        t["tactic"] = json!({ "uid": tactic_uid, "name": tactic });
    }
    if let Some((parent, _)) = id.split_once('.') {
        t["technique"]["uid"] = parent.into();
        t["sub_technique"] = json!({ "uid": id, "name": name });
    }
    t
}

fn epoch_ms(time: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(time).map(|t| t.timestamp_millis()).unwrap_or(0)
}

fn process(e: &Event) -> Value {
    let p = &e.process;
    let name = p.exe.rsplit('/').next().unwrap_or("");
    let mut v = json!({
        "pid": p.pid,
        "cmd_line": p.cmdline,
        "file": { "path": p.exe, "name": name, "type_id": 1, "type": "Regular File" },
        "user": { "uid": p.uid.to_string(), "type_id": if p.uid == 0 { 2 } else { 1 } },
        "parent_process": { "pid": p.ppid },
    });
    if p.exe.is_empty() {
        v.as_object_mut().unwrap().remove("file");
    }
    v
}

fn file(e: &Event) -> Option<Value> {
    let f = e.file.as_ref()?;
    Some(json!({
        "path": f.path,
        "name": f.path.rsplit('/').next().unwrap_or(""),
        "type_id": 1,
        "type": "Regular File",
        "uid": format!("{}:{}", f.dev, f.ino),
    }))
}

fn dst(e: &Event) -> Option<Value> {
    let d = e.destination.as_ref()?;
    let mut v = json!({ "ip": d.ip, "port": d.port });
    if let Some(name) = &d.name {
        v["hostname"] = name.clone().into();
    }
    Some(v)
}

fn unmapped(e: &Event) -> Value {
    let mut u = json!({
        "schema": e.schema,
        "kind": e.kind,
        "verdict": e.verdict,
        "action": e.action,
        "mode": e.mode,
        "cgroup": e.process.cgroup,
    });
    if !e.decision_path.is_empty() {
        u["decision_path"] = json!(e.decision_path);
    }
    if let Some(g) = &e.grant {
        u["grant"] = serde_json::to_value(g).unwrap_or(Value::Null);
    }
    if let Some(f) = &e.file {
        u["secret"] = f.secret.clone().into();
    }
    if !e.secrets.is_empty() {
        u["secrets"] = json!(e.secrets);
    }
    u
}

fn title(e: &Event) -> String {
    let what = match (&e.file, &e.destination) {
        (Some(f), _) => format!("secret {} ({}) opened", f.secret, f.path),
        (_, Some(d)) => format!("connection to {}:{}", d.ip, d.port),
        _ => e.kind.clone(),
    };
    let why = match e.verdict.as_str() {
        "no_grant" => "without a grant",
        "expired" => "after its grant expired",
        "revoked" => "after its grant was revoked",
        "out_of_intent" => "outside its grant's intent",
        other => other,
    };
    one_line(&format!("{what} {why} by {} (pid {}): {}", e.process.exe, e.process.pid, e.action))
}

/// A title for a SIEM's list view: control characters (a newline in a file or exe name could
/// fake a second entry in tools that print titles raw) shown as `\uXXXX`. The full values stay
/// in their own fields, exactly.
fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
            out.push_str(&format!("\\u{:04X}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// One OCSF object for one native event.
pub fn to_ocsf(e: &Event) -> Value {
    let sev = severity_id(&e.severity);
    let violation = e.verdict != "allowed";
    let (class_uid, category_uid, activity_id, activity, class_name, category_name): (
        u32,
        u32,
        u32,
        &str,
        &str,
        &str,
    ) = match (violation, e.kind.as_str()) {
        (true, _) => (2004, 2, 1, "Create", "Detection Finding", "Findings"),
        (false, "file_open") => (1001, 1, 14, "Open", "File System Activity", "System Activity"),
        (false, "connect") => (4001, 4, 1, "Open", "Network Activity", "Network Activity"),
        (false, "grant_issued") => (
            3005,
            3,
            1,
            "Assign Privileges",
            "User Access Management",
            "Identity & Access Management",
        ),
        (false, k) if k.starts_with("grant_") => (
            3005,
            3,
            2,
            "Revoke Privileges",
            "User Access Management",
            "Identity & Access Management",
        ),
        (false, "agent_started") => {
            (6002, 6, 3, "Start", "Application Lifecycle", "Application Activity")
        }
        (false, "agent_stopped") => {
            (6002, 6, 4, "Stop", "Application Lifecycle", "Application Activity")
        }
        (false, _) => (6002, 6, 99, "Other", "Application Lifecycle", "Application Activity"),
    };
    let mut o = json!({
        "class_uid": class_uid,
        "class_name": class_name,
        "category_uid": category_uid,
        "category_name": category_name,
        "activity_id": activity_id,
        "activity_name": activity,
        "type_uid": class_uid as u64 * 100 + activity_id as u64,
        "type_name": format!("{class_name}: {activity}"),
        "time": epoch_ms(&e.time),
        "severity_id": sev,
        "severity": severity_label(sev),
        "status_id": 1,
        "status": "Success",
        "metadata": {
            "version": OCSF_VERSION,
            "uid": e.id,
            "original_time": e.time,
            "log_name": e.schema,
            "product": { "name": "enforcer", "vendor_name": VENDOR, "version": env!("CARGO_PKG_VERSION") },
            "profiles": ["host", "security_control"],
        },
        "device": { "hostname": e.host, "type_id": 0 },
        "actor": { "process": process(e) },
        "unmapped": unmapped(e),
    });
    if let Some(m) = &e.message {
        o["message"] = m.clone().into();
    }
    let (disp_id, disp) = disposition(&e.action);
    o["disposition_id"] = disp_id.into();
    o["disposition"] = disp.into();
    // security_control profile: the outcome for the access itself.
    let denied = matches!(e.action.as_str(), "denied" | "killed");
    o["action_id"] = if denied { 2 } else { 1 }.into();
    o["action"] = if denied { "Denied" } else { "Allowed" }.into();

    match class_uid {
        1001 => {
            o["file"] = file(e).unwrap_or(json!({ "path": "", "name": "", "type_id": 0 }));
        }
        4001 => {
            o["dst_endpoint"] = dst(e).unwrap_or(json!({}));
            o["src_endpoint"] = json!({ "hostname": e.host });
            o["connection_info"] = json!({
                "protocol_name": e.destination.as_ref().map(|d| d.protocol.clone()).unwrap_or_default(),
                "direction_id": 2,
                "direction": "Outbound",
            });
        }
        3005 => {
            o["privileges"] = json!(
                e.grant.as_ref().map(|g| vec![format!("intent:{}", g.intent)]).unwrap_or_default()
            );
            o["user"] = json!({ "uid": e.process.uid.to_string() });
        }
        2004 => {
            if e.kind == "connect" && denied {
                // The use itself was refused (Network Activity would say Refuse).
                o["status_id"] = 2.into();
                o["status"] = "Failure".into();
            }
            let mut evidence = json!({ "process": process(e) });
            if let Some(f) = file(e) {
                evidence["file"] = f;
            }
            if let Some(d) = dst(e) {
                evidence["dst_endpoint"] = d;
            }
            o["evidences"] = json!([evidence]);
            o["finding_info"] = json!({
                "uid": e.id,
                "title": title(e),
                "desc": e.message.as_deref().map(one_line).unwrap_or_else(|| title(e)),
                "types": [e.verdict],
                "analytic": { "name": format!("enforcer {}", e.verdict), "type_id": 1, "type": "Rule" },
                "created_time": epoch_ms(&e.time),
                "attacks": e.mitre.iter().map(|t| technique(t)).collect::<Vec<_>>(),
            });
        }
        _ => {}
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_strings_stay_json_strings_and_titles_one_line() {
        let e: Event = serde_json::from_value(json!({
            "schema": "enforcer.event/v1", "id": "i\"}", "time": "2026-01-02T03:04:05Z",
            "host": "h", "kind": "file_open", "verdict": "no_grant", "action": "denied",
            "mode": "enforce", "severity": "high", "message": "m\r\nforged: yes",
            "process": { "pid": 7, "ppid": 1, "uid": 1000, "exe": "/tmp/a\nb\"},{",
                         "cmdline": "x [redacted:0011aabb]", "cgroup": "/" },
            "file": { "path": "/s\u{2028}x\u{0}", "dev": 1, "ino": 2, "secret": "s]\"" },
        }))
        .unwrap();
        let o = to_ocsf(&e);
        let line = o.to_string();
        assert!(!line.contains('\n'), "{line}");
        let back: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back["actor"]["process"]["file"]["path"], e.process.exe.as_str());
        assert_eq!(back["actor"]["process"]["cmd_line"], e.process.cmdline.as_str());
        assert_eq!(back["metadata"]["uid"], e.id.as_str());
        let title = back["finding_info"]["title"].as_str().unwrap();
        assert!(!title.chars().any(|c| c.is_control() || c == '\u{2028}'), "{title:?}");
        assert!(title.contains("/tmp/a\\u000Ab"), "{title}");
        let desc = back["finding_info"]["desc"].as_str().unwrap();
        assert_eq!(desc, "m\\u000D\\u000Aforged: yes");
        assert_eq!(back["message"], e.message.as_deref().unwrap());
    }
}
