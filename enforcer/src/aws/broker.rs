//! The AWS credential broker: per grant of an intent with `[intent.aws]`, an authorization
//! token for the container-credentials endpoint (written to a 0600 file owned by the grant
//! subject's uid), and the credentials STS minted for the grant, cached until shortly before
//! they expire. A grant's credentials are minted with `RoleSessionName` = the grant id, the
//! intent's session policy, and a duration no longer than the grant (at least STS's 900 s).
//!
//! Serving decisions (who holds which grant) are made by the callers from the kernel's maps
//! (`mint::holder`); the broker only remembers what it minted, so that when a grant ends
//! the event can name the credentials still outstanding.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Duration, Utc};
use tokio::sync::mpsc::UnboundedSender;

use super::notice::CredentialNotice;
use super::sts::{self, MAX_DURATION_S, MIN_DURATION_S, Minted};
use crate::event::CredentialRef;
use crate::mint::model::Grant;
use crate::mint::view::{GrantFacts, GrantView};
use crate::policy::{AwsIntent, AwsSettings};

/// Directory under the runtime dir holding one token file per grant.
pub const TOKEN_DIR: &str = "aws";
/// Path the SDKs are pointed at (any path works; this one says what it is).
pub const CREDENTIALS_PATH: &str = "/v1/aws/credentials";
/// Cached credentials are minted again when less than this is left and the grant outlives them.
const REFRESH_BEFORE: i64 = 5 * 60;
/// Never hand out credentials with less than this left.
const MIN_LEFT: i64 = 60;

/// What `enforcer run` exports for a grant.
#[derive(Debug, Clone)]
pub struct AwsEnv {
    pub credentials_full_uri: String,
    pub authorization_token_file: PathBuf,
}

struct Entry {
    intent: String,
    token: String,
    token_file: PathBuf,
    /// The cached credentials; the async lock makes one STS call per grant at a time.
    cache: Arc<tokio::sync::Mutex<Option<Minted>>>,
    /// Everything minted for the grant (id, expiry, role), for the end-of-grant event.
    minted: Vec<CredentialRef>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// token -> grant id.
    tokens: HashMap<String, String>,
}

pub struct Broker {
    settings: AwsSettings,
    token_dir: PathBuf,
    /// The loopback endpoint's port once listening (0 before).
    port: AtomicU16,
    inner: Mutex<Inner>,
    notices: UnboundedSender<CredentialNotice>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Broker {
    pub fn new(
        settings: AwsSettings,
        runtime_dir: &Path,
        notices: UnboundedSender<CredentialNotice>,
    ) -> Broker {
        Broker {
            settings,
            token_dir: runtime_dir.join(TOKEN_DIR),
            port: AtomicU16::new(0),
            inner: Mutex::new(Inner::default()),
            notices,
        }
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.settings.listen
    }

    pub fn set_port(&self, port: u16) {
        self.port.store(port, Ordering::SeqCst);
    }

    pub fn port(&self) -> u16 {
        self.port.load(Ordering::SeqCst)
    }

    /// The endpoint URI for the SDKs (None while not listening).
    pub fn endpoint_uri(&self) -> Option<String> {
        let port = self.port();
        (port != 0).then(|| {
            let ip = self.settings.listen.ip();
            let host = if ip.is_ipv6() { format!("[{ip}]") } else { ip.to_string() };
            format!("http://{host}:{port}{CREDENTIALS_PATH}")
        })
    }

    /// The local endpoint as a grant destination: grants of AWS intents may always reach it.
    pub fn endpoint_destination(&self) -> Option<String> {
        let port = self.port();
        (port != 0).then(|| match self.settings.listen.ip() {
            std::net::IpAddr::V4(a) => format!("{a}/32:{port}"),
            std::net::IpAddr::V6(a) => format!("[{a}/128]:{port}"),
        })
    }

    /// A new grant of an AWS intent: its token, in a file only the subject's uid can read.
    pub fn register(&self, grant: &Grant) -> std::io::Result<Option<AwsEnv>> {
        let Some(uri) = self.endpoint_uri() else { return Ok(None) };
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| std::io::Error::other(e.to_string()))?;
        let token = hex::encode(raw);
        let file = self.write_token(&grant.id, &token, grant.subject.uid, grant.subject.gid)?;
        let mut inner = lock(&self.inner);
        inner.tokens.insert(token.clone(), grant.id.clone());
        inner.entries.insert(
            grant.id.clone(),
            Entry {
                intent: grant.intent.clone(),
                token,
                token_file: file.clone(),
                cache: Default::default(),
                minted: Vec::new(),
            },
        );
        Ok(Some(AwsEnv { credentials_full_uri: uri, authorization_token_file: file }))
    }

    fn write_token(&self, id: &str, token: &str, uid: u32, gid: u32) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.token_dir)?;
        // Others may traverse to their own file, never list the directory.
        std::fs::set_permissions(&self.token_dir, std::fs::Permissions::from_mode(0o711))?;
        let path = self.token_dir.join(format!("{id}.token"));
        let tmp = self.token_dir.join(format!(".{id}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(token.as_bytes())?;
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// Re-attaches token files a previous daemon wrote for grants still live (the SDKs in
    /// those jobs keep reading them); removes the others.
    pub fn restore(&self, live: &[(String, String)]) {
        let Ok(dir) = std::fs::read_dir(&self.token_dir) else { return };
        let mut inner = lock(&self.inner);
        for e in dir.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let grant = name.strip_suffix(".token").and_then(|id| live.iter().find(|g| g.0 == id));
            match (grant, std::fs::read_to_string(&path)) {
                (Some(g), Ok(token)) if token.len() == 64 => {
                    inner.tokens.insert(token.clone(), g.0.clone());
                    inner.entries.insert(
                        g.0.clone(),
                        Entry {
                            intent: g.1.clone(),
                            token,
                            token_file: path,
                            cache: Default::default(),
                            minted: Vec::new(),
                        },
                    );
                }
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }

    /// The grant an authorization token was issued for.
    pub fn grant_of_token(&self, token: &str) -> Option<String> {
        lock(&self.inner).tokens.get(token.trim()).cloned()
    }

    /// Credentials for a live grant (the caller checked, from the kernel, that the
    /// requesting process holds it): cached, or minted by STS now. Off every decision path.
    pub async fn credentials(
        &self,
        g: &GrantFacts,
        aws: &AwsIntent,
        pid: u32,
    ) -> Result<Minted, String> {
        let cache = {
            let mut inner = lock(&self.inner);
            let e = inner.entries.entry(g.id.clone()).or_insert_with(|| Entry {
                intent: g.intent.clone(),
                token: String::new(),
                token_file: PathBuf::new(),
                cache: Default::default(),
                minted: Vec::new(),
            });
            e.cache.clone()
        };
        let mut cached = cache.lock().await;
        let now = Utc::now();
        if let Some(m) = cached.as_ref() {
            let left = (m.expiration - now).num_seconds();
            if left > MIN_LEFT && (left > REFRESH_BEFORE || g.expires_at <= m.expiration) {
                return Ok(m.clone());
            }
        }
        let duration = session_duration(g.expires_at, now);
        let base = sts::base_credentials(&self.settings).map_err(|e| format!("{e:#}"))?;
        let m =
            sts::assume_role(&base, aws, &g.id, duration).await.map_err(|e| format!("{e:#}"))?;
        *cached = Some(m.clone());
        let cred = CredentialRef {
            provider: "aws".into(),
            access_key_id: m.access_key_id.clone(),
            expires_at: crate::event::rfc3339(m.expiration),
            role_arn: aws.role_arn.clone(),
        };
        if let Some(e) = lock(&self.inner).entries.get_mut(&g.id) {
            e.minted.push(cred.clone());
        }
        let outlives = m.expiration > g.expires_at;
        let _ = self.notices.send(CredentialNotice::issued(pid, g, cred, duration, outlives, &m));
        Ok(m)
    }

    /// Drops what belongs to grants no longer active (token files, cache) and announces
    /// the credentials those grants still had outstanding. Run every second.
    pub fn sweep(&self, view: &GrantView) {
        let now = Utc::now();
        let mut inner = lock(&self.inner);
        let ended: Vec<String> =
            inner.entries.keys().filter(|id| !active(view, id, now)).cloned().collect();
        for id in ended {
            let Some(e) = inner.entries.remove(&id) else { continue };
            inner.tokens.remove(&e.token);
            if !e.token_file.as_os_str().is_empty() {
                let _ = std::fs::remove_file(&e.token_file);
            }
            let outstanding: Vec<CredentialRef> = e
                .minted
                .into_iter()
                .filter(|c| DateTime::parse_from_rfc3339(&c.expires_at).is_ok_and(|t| t > now))
                .collect();
            if !outstanding.is_empty() {
                let (how, facts) = how_ended(view, &id, now);
                let _ = self.notices.send(CredentialNotice::outstanding(
                    &id,
                    &e.intent,
                    how,
                    facts,
                    outstanding,
                ));
            }
        }
    }
}

/// STS duration for a grant ending at `grant_end`: what is left of the grant, at least
/// STS's minimum (the broker stops serving at the grant's end regardless) and at most an
/// IAM role's default maximum session.
pub fn session_duration(grant_end: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
    let left = (grant_end - now).num_seconds().max(0) as u64;
    left.clamp(MIN_DURATION_S, MAX_DURATION_S)
}

fn active(view: &GrantView, id: &str, now: DateTime<Utc>) -> bool {
    view.grants.values().any(|g| g.id == id && !g.revoked && g.expires_at > now)
}

/// How a grant ended, from the view: revoked, expired, or its subtree exited.
fn how_ended(
    view: &GrantView,
    id: &str,
    now: DateTime<Utc>,
) -> (&'static str, Option<Arc<GrantFacts>>) {
    let g = view.grants.values().chain(view.ended.values()).find(|g| g.id == id).cloned();
    let how = match &g {
        Some(g) if g.revoked => "revoked",
        Some(g) if g.expires_at <= now + Duration::milliseconds(500) => "expired",
        _ => "ended",
    };
    (how, g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let now = Utc::now();
        assert_eq!(session_duration(now + Duration::seconds(60), now), 900);
        assert_eq!(session_duration(now - Duration::seconds(60), now), 900);
        assert_eq!(session_duration(now + Duration::seconds(1800), now), 1800);
        assert_eq!(session_duration(now + Duration::hours(5), now), 3600);
    }
}
