//! The daemon's HTTP/1.1 + JSON API on the Unix socket `<runtime_dir>/mint.sock`.
pub mod client;
pub mod conn;
pub mod credentials;
pub mod error;
pub mod mint;
pub mod server;

pub const SOCKET_NAME: &str = "mint.sock";
/// Request bodies above this are refused with 413 before being read further.
pub const MAX_BODY: usize = 64 * 1024;
