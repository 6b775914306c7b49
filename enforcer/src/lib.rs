//! enforcer as a library: every module of the agent, so the binary, the integration tests,
//! the fuzz targets and the bench share one build of the same code.
//!
//! Data flows one way (see docs/architecture.md): `kernel` (hooks, maps) and `records`
//! (ring-buffer decoding) -> `proc` (attribution) -> `decide` (the verdict; connections through
//! the shared judge in `enforcer_common::judge`) -> `act` (deny, kill, revoke, taint in the
//! kernel maps) and `alert` (outbox and sinks). `mint` issues grants; `api` serves it; `cli` is
//! the binary.
pub mod act;
pub mod alert;
pub mod api;
pub mod aws;
pub mod cgroup;
pub mod cli;
pub mod daemon;
pub mod decide;
pub mod dest_table;
pub mod dns;
pub mod event;
pub mod file;
pub mod kernel;
pub mod mint;
pub mod netlink;
pub mod policy;
pub mod proc;
pub mod records;
pub mod redact;
pub mod report;
pub mod spiffe;
pub mod store;
pub mod sync;
