//! What can go wrong when issuing, looking up or revoking a grant, in the mint's own terms.
//! The Mint API (`crate::api::error`) maps each variant to an HTTP status and its stable
//! JSON error code; nothing here knows about HTTP.
use std::time::Duration;

use super::model::GrantState;
use super::request::RequestError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    /// The request body was refused by the parser.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The requested TTL cannot be represented.
    #[error("{0}")]
    InvalidTtl(String),
    #[error("{0}")]
    InvalidPid(String),
    #[error("no intent named {0:?}")]
    UnknownIntent(String),
    #[error("{0}")]
    NoSuchProcess(String),
    /// The kernel could not vouch for the caller (or the target) process.
    #[error("{0}")]
    AttestationFailed(String),
    /// The process exited (or was replaced) while it was identified or bound.
    #[error("{0}")]
    SubjectGone(String),
    /// The target is neither the caller nor one of its descendants.
    #[error("{0}")]
    NotYourProcess(String),
    /// The grant belongs to another uid.
    #[error("{0}")]
    NotYourGrant(String),
    /// The intent names no agent selector: nobody may request it.
    #[error("{0}")]
    NoAgents(String),
    /// None of the intent's agent selectors matches the process.
    #[error("{0}")]
    AgentNotAllowed(String),
    #[error("too many grant requests from uid {uid}; retry in {} ms", retry.as_millis())]
    RateLimited { uid: u32, retry: Duration },
    /// A uid or a cgroup already holds as many live grants as `[limits]` allows.
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("no grant {0}")]
    UnknownGrant(String),
    /// The grant has already ended (expired, revoked, or its subtree exited).
    #[error("grant {id} is {}", state.as_str())]
    NotActive { id: String, state: GrantState },
    /// The subject already holds as many grants as the kernel keeps per process.
    #[error("{0}")]
    TooManyGrants(String),
    #[error("{0}")]
    Internal(String),
}

impl MintError {
    /// An internal failure, logged where it is made.
    pub fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        tracing::error!("mint: {message}");
        MintError::Internal(message)
    }
}
