//! Brokered AWS credentials: STS AssumeRole per grant (`sts`, signed by `sigv4`), cached and
//! tracked by the `broker`, served to granted processes on the loopback container-credentials
//! endpoint (`endpoint`, callers attested through their socket: `peer`) and through the mint
//! socket for `credential_process` (api/credentials.rs).
pub mod broker;
pub mod endpoint;
pub mod notice;
pub mod peer;
pub mod sigv4;
pub mod sts;

pub use broker::{AwsEnv, Broker};
pub use notice::CredentialNotice;
