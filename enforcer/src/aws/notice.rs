//! What the credential services report to the event stream: a credential minted or
//! refused, a daemon-held secret delivered or refused, credentials outstanding when a grant
//! ended. Built where it happens (API tasks), written by the daemon's engine, which owns
//! the event store. Never carries a secret value: key ids, names and expiries only.
use std::sync::Arc;

use crate::event::{CredentialRef, GrantRef};
use crate::mint::view::GrantFacts;

#[derive(Debug, Clone)]
pub struct CredentialNotice {
    pub kind: &'static str,
    /// The process served or refused (0 when unknown).
    pub pid: u32,
    /// The executable the API attested for `pid` (readlink of /proc/PID/exe while serving it),
    /// when known: the process may have exited before the engine writes the event.
    pub exe: Option<String>,
    pub verdict: &'static str,
    pub action: &'static str,
    pub severity: &'static str,
    pub grant: Option<GrantRef>,
    pub secrets: Vec<String>,
    pub credentials: Vec<CredentialRef>,
    pub decision_path: Vec<String>,
    pub message: String,
}

pub fn grant_ref(g: &GrantFacts) -> GrantRef {
    GrantRef {
        id: g.id.clone(),
        intent: g.intent.clone(),
        expires_at: crate::event::rfc3339(g.expires_at),
        expired_for_ms: None,
    }
}

impl CredentialNotice {
    pub fn issued(
        pid: u32,
        g: &GrantFacts,
        cred: CredentialRef,
        duration_s: u64,
        outlives: bool,
        m: &super::sts::Minted,
    ) -> Self {
        let mut path = vec![
            format!("pid {pid} holds grant {} (kernel PROC_GRANTS, GRANTS)", g.id),
            format!("STS AssumeRole {} as session {} for {duration_s} s", cred.role_arn, g.id),
        ];
        if outlives {
            path.push(format!(
                "STS minimum 900 s outlives the grant ({}): serving stops at the grant's end",
                crate::event::rfc3339(g.expires_at)
            ));
        }
        CredentialNotice {
            exe: None,
            kind: "aws_credentials_issued",
            pid,
            verdict: "allowed",
            action: "allowed",
            severity: "info",
            grant: Some(grant_ref(g)),
            secrets: vec![],
            message: format!(
                "AWS credentials {} ({}) minted for grant {} (intent {}) until {}",
                cred.access_key_id, m.assumed_role_arn, g.id, g.intent, cred.expires_at
            ),
            credentials: vec![cred],
            decision_path: path,
        }
    }

    /// A refusal: `verdict` `no_grant` (the caller holds no live grant for it) or
    /// `revoked`/`expired` when the grant it names has ended.
    pub fn refused(
        kind: &'static str,
        pid: u32,
        verdict: &'static str,
        grant: Option<&GrantFacts>,
        secret: Option<&str>,
        why: String,
    ) -> Self {
        CredentialNotice {
            exe: None,
            kind,
            pid,
            verdict,
            action: "denied",
            severity: "high",
            grant: grant.map(grant_ref),
            secrets: secret.map(|s| vec![s.to_string()]).unwrap_or_default(),
            credentials: vec![],
            decision_path: vec![why.clone()],
            message: why,
        }
    }

    pub fn outstanding(
        id: &str,
        intent: &str,
        how: &'static str,
        facts: Option<Arc<GrantFacts>>,
        creds: Vec<CredentialRef>,
    ) -> Self {
        let ids: Vec<String> =
            creds.iter().map(|c| format!("{} until {}", c.access_key_id, c.expires_at)).collect();
        CredentialNotice {
            exe: None,
            kind: "aws_credentials_outstanding",
            pid: 0,
            verdict: match how {
                "revoked" => "revoked",
                "expired" => "expired",
                _ => "allowed",
            },
            action: "alerted",
            severity: if how == "revoked" { "high" } else { "medium" },
            grant: Some(facts.as_deref().map(grant_ref).unwrap_or(GrantRef {
                id: id.to_string(),
                intent: intent.to_string(),
                expires_at: String::new(),
                expired_for_ms: None,
            })),
            secrets: vec![],
            decision_path: vec![
                format!("grant {id} {how}: the broker stopped serving its AWS credentials"),
                "the grant's holders are judged against its destinations as an ended grant until they exit".into(),
            ],
            message: format!(
                "grant {id} (intent {intent}) {how} with AWS credentials still valid at STS: {}",
                ids.join(", ")
            ),
            credentials: creds,
        }
    }
}
