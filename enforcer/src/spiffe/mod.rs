//! Workload identity: the SPIFFE Workload API on `<runtime_dir>/spiffe.sock` (gRPC,
//! `workload.rs`), JWT-SVIDs signed with rotating ES256 keys (`jwt.rs`, `keys.rs`), and OIDC
//! discovery for federation (`oidc.rs`).
//!
//! Who may have which SVID is decided from the kernel's facts only: the caller is the process
//! on the other end of the socket (SO_PEERCRED + pidfd, `mint::attest`), the grants it holds are
//! its `PROC_GRANTS` entry (inherited by every process forked in a grant's subtree), and each
//! grant must still be live in the kernel's `GRANTS` map (not revoked, before its deadline) and
//! its intent must name audiences. Nothing the caller sends says who it is.
pub mod authz;
pub mod jwt;
pub mod keys;
pub mod oidc;
pub mod workload;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    include!("proto/workload.rs");
}

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context;
use chrono::Utc;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use crate::decide::Verdict;
use crate::kernel::grants::ActMaps;
use crate::mint::registry::Registry;
use crate::mint::view::ViewCell;
use crate::policy::SpiffeConfig;
use keys::KeyRing;

/// File name of the Workload API socket in the runtime dir.
pub const SOCKET_NAME: &str = "spiffe.sock";

/// The trust bundle as published: the JWKS, its bytes (what FetchJWTBundles sends) and the
/// kids it holds. Replaced on every key rotation.
#[derive(Debug, Clone, PartialEq)]
pub struct Bundle {
    pub jwks: Value,
    pub bytes: Vec<u8>,
}

/// An SVID issued or refused, for the event stream (never the token itself).
#[derive(Debug, Clone)]
pub struct SvidEvent {
    pub pid: u32,
    pub issued: bool,
    pub verdict: Verdict,
    /// (grant id, intent, grant expiry) the SVID was issued or refused under.
    pub grant: Option<(String, String, chrono::DateTime<Utc>)>,
    pub decision_path: Vec<String>,
    pub message: String,
}

pub struct Spiffe {
    pub cfg: SpiffeConfig,
    state_dir: PathBuf,
    keys: RwLock<Arc<KeyRing>>,
    bundle: watch::Sender<Arc<Bundle>>,
    pub view: Arc<ViewCell>,
    pub maps: ActMaps,
    /// For the subject of a grant (uid/gid placeholders of `spiffe_id`); locked briefly.
    pub registry: Arc<Mutex<Registry>>,
    pub events: mpsc::UnboundedSender<SvidEvent>,
}

impl Spiffe {
    /// Loads (or creates) the signing keys, rotating at once if the current key is overdue.
    pub fn new(
        cfg: SpiffeConfig,
        state_dir: PathBuf,
        view: Arc<ViewCell>,
        maps: ActMaps,
        registry: Arc<Mutex<Registry>>,
        events: mpsc::UnboundedSender<SvidEvent>,
    ) -> anyhow::Result<Arc<Spiffe>> {
        let now = Utc::now();
        let mut ring = KeyRing::load_or_create(&state_dir, now)?;
        if ring.next_rotation(cfg.key_rotation) <= now {
            ring.rotate(&state_dir, now).context("rotating the JWT-SVID signing key")?;
        }
        let (bundle, _) = watch::channel(Arc::new(bundle_of(&ring)));
        Ok(Arc::new(Spiffe {
            cfg,
            state_dir,
            keys: RwLock::new(Arc::new(ring)),
            bundle,
            view,
            maps,
            registry,
            events,
        }))
    }

    pub fn keys(&self) -> Arc<KeyRing> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn bundle(&self) -> Arc<Bundle> {
        self.bundle.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Bundle>> {
        self.bundle.subscribe()
    }

    /// Replaces the current key when it is due; returns when the next one is due.
    pub fn rotate_if_due(&self) -> anyhow::Result<chrono::DateTime<Utc>> {
        let now = Utc::now();
        let mut guard = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if guard.next_rotation(self.cfg.key_rotation) > now {
            return Ok(guard.next_rotation(self.cfg.key_rotation));
        }
        // Rotate a copy: a failed save leaves the key set in force unchanged.
        let mut ring = KeyRing::load_or_create(&self.state_dir, now)?;
        ring.rotate(&self.state_dir, now)?;
        let next = ring.next_rotation(self.cfg.key_rotation);
        tracing::info!(kid = %ring.current.kid, "JWT-SVID signing key rotated");
        self.bundle.send_replace(Arc::new(bundle_of(&ring)));
        *guard = Arc::new(ring);
        Ok(next)
    }

    /// Rotates keys on schedule, forever.
    pub fn spawn_rotation(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let next = match me.rotate_if_due() {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::error!("JWT-SVID key rotation failed (retrying in 10s): {e:#}");
                        Utc::now() + chrono::Duration::seconds(10)
                    }
                };
                let wait = (next - Utc::now()).to_std().unwrap_or_default();
                tokio::time::sleep(wait.max(std::time::Duration::from_millis(10))).await;
            }
        })
    }

    /// Trust domain as a SPIFFE ID (`spiffe://example.org`), the bundle map's key.
    pub fn trust_domain_id(&self) -> String {
        format!("spiffe://{}", self.cfg.trust_domain)
    }
}

fn bundle_of(ring: &KeyRing) -> Bundle {
    let jwks = ring.jwks();
    Bundle { bytes: serde_json::to_vec(&jwks).unwrap_or_default(), jwks }
}

/// Binds the Workload API socket (world-connectable: every caller is authorized by the grants
/// the kernel says it holds) and serves it, with key rotation.
pub fn start(spiffe: Arc<Spiffe>, runtime_dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = runtime_dir.join(SOCKET_NAME);
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("bind {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
    spiffe.spawn_rotation();
    if let Some(addr) = spiffe.cfg.oidc_listen {
        oidc::spawn_listener(spiffe.clone(), addr)?;
    }
    tokio::spawn(workload::serve(listener, spiffe));
    Ok(())
}
