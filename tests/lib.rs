//! Harness for the integration tests: a cgroup the test owns, a real daemon confined to it,
//! real processes started inside it, and the daemon's stored events to assert on.
//!
//! Every test that needs the kernel calls `root_or_skip()` first: without root the kernel
//! programs cannot load, and the test says so instead of passing silently.
//!
//! One copy of each helper, by subject:
//! - [`cgroup`]: the test cgroup and commands that join a cgroup before exec;
//! - [`daemon`]: start, stop, restart a daemon; its status, CLI, API and stored events (typed
//!   `enforcer::event::Event`); teardown asserts zero decision mismatches;
//! - [`events`]: event predicates and accessors;
//! - [`net`]: loopback listeners and the TLS receivers (syslog, Splunk HEC) sinks deliver to;
//! - [`pki`]: a throw-away CA and a server certificate;
//! - [`dns_net`]: the DNS tests' namespace (a real DNS server, an echo listener) and daemon;
//! - [`enforce_fixture`]: the enforce-mode fixture shared by the enforcement tests;
//! - [`env`]: binaries, files and programs the tests run;
//! - [`fuse_stall`]: a FUSE file system whose reads wait, to hold a process's `mmap_lock`.
#[path = "support/cgroup.rs"]
pub mod cgroup;
#[path = "support/daemon.rs"]
pub mod daemon;
#[path = "support/dns_net.rs"]
pub mod dns_net;
#[path = "support/enforce_fixture.rs"]
pub mod enforce_fixture;
#[path = "support/env.rs"]
pub mod env;
#[path = "support/events.rs"]
pub mod events;
#[path = "support/fuse_stall.rs"]
pub mod fuse_stall;
#[path = "support/net.rs"]
pub mod net;
#[path = "support/pki.rs"]
pub mod pki;

pub use cgroup::{TestCgroup, command_in};
pub use daemon::Daemon;
pub use enforcer::event::Event;
pub use env::{
    dev_ino, enforcer, enforcer_bin, helper_bin, python, root_or_skip, secret_file, secret_toml,
    time_scale, which,
};
pub use events::{EventExt, assert_required_fields, by, parse_events};
pub use net::{http_listener, tcp_listener};
