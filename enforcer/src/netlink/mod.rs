//! Netlink clients of the daemon.
pub mod sock_diag;
