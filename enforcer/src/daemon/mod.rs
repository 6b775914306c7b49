//! The agent: validate config, take the single-instance lock, load and attach the kernel
//! programs, seed processes, watch secrets, serve the API, and turn records into events
//! until SIGTERM/SIGINT. Nothing touches the kernel before the config is valid.
mod adopt;
mod engine;
mod literals;
pub(crate) mod lock;
mod replay;
mod status;

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};

use crate::act::Actor;
use crate::api::{self, mint::MintState, server::ApiState};
use crate::file::SecretWatch;
use crate::kernel::policy::SecretIndex;
use crate::kernel::{self, Kernel};
use crate::mint::ledger::Ledger;
use crate::mint::ratelimit::RateLimiter;
use crate::mint::registry::{Notice, Registry, RestoreInput, resolve_secret_nets};
use crate::mint::token::Signer;
use crate::mint::view::{GrantView, PolicyFacts, ViewCell};
use crate::mint::writer::LedgerTx;
use crate::policy::Config;
use crate::proc::ProcessTable;
use crate::records;
use crate::store::EventStore;
use engine::{Engine, GrantLinks};

/// Longest a kernel record waits in the ring buffer before the daemon reads it.
const DRAIN_INTERVAL_MS: u64 = 20;
/// A secret open not judged this long after the daemon read it is answered with the safe
/// default (deny in enforce mode, allow in monitor mode) and recorded as such.
const FILE_DECISION_DEADLINE: Duration = Duration::from_millis(500);
/// Lineage records read before answering waiting opens: bounded, so a fork/exec flood
/// cannot delay the answers (the rest is read on the next turn).
const LINEAGE_BEFORE_ANSWER: usize = 4096;

/// Everything resolved from the config before the kernel is touched.
pub struct Setup {
    pub config: Config,
    pub config_path: Option<PathBuf>,
    pub cgroup_mount: PathBuf,
    pub cgroup_root: PathBuf,
    pub cgroup_scope: String,
    pub host: String,
}

pub fn prepare(config: Config, config_path: Option<PathBuf>) -> Result<Setup> {
    let cgroup_mount = kernel::cgroup2_mount()?;
    let cgroup_root = match &config.cgroup_root {
        Some(p) => p.clone(),
        None => cgroup_mount.clone(),
    };
    let meta = std::fs::metadata(&cgroup_root)
        .with_context(|| format!("cgroup_root {}", cgroup_root.display()))?;
    if !meta.is_dir() || !cgroup_root.starts_with(&cgroup_mount) {
        bail!(
            "cgroup_root {} is not a directory of the cgroup2 mount {}",
            cgroup_root.display(),
            cgroup_mount.display()
        );
    }
    let rel = cgroup_root.strip_prefix(&cgroup_mount).unwrap_or(Path::new(""));
    let cgroup_scope = format!("/{}", rel.display()).trim_end_matches('/').to_string();
    let cgroup_scope = if cgroup_scope.is_empty() { "/".into() } else { cgroup_scope };
    let host = match &config.host {
        Some(h) => h.clone(),
        None => nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into()),
    };
    Ok(Setup { config, config_path, cgroup_mount, cgroup_root, cgroup_scope, host })
}

fn make_dir(path: &Path, mode: u32) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .with_context(|| format!("create {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(())
}

/// Open files the daemon asks for: API connections (two fds each, capped by
/// `limits.api_max_connections`), pidfds, ring buffers, maps, secret and directory marks,
/// sinks. Raised to this (or the hard limit, if lower) at start.
const NOFILE_WANTED: u64 = 65_536;

fn raise_nofile() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write one rlimit struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let (soft, want) = (lim.rlim_cur, NOFILE_WANTED.min(lim.rlim_max));
    if soft < want {
        lim.rlim_cur = want;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
            tracing::info!(from = soft, to = want, "raised RLIMIT_NOFILE");
        } else {
            let e = std::io::Error::last_os_error();
            tracing::warn!("cannot raise RLIMIT_NOFILE from {soft} to {want}: {e}");
        }
    }
}

pub fn run(setup: Setup) -> Result<()> {
    let cfg = &setup.config;
    // Before any thread exists: glibc gives every thread that allocates its own arena (64 MiB
    // reserved each, kept fragmented after bursts); two are plenty for this daemon's threads
    // and keep RSS flat after alert bursts.
    // SAFETY: mallopt only changes allocator parameters.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    // A fixed mmap threshold (glibc otherwise raises it to the largest block freed, up to
    // 32 MiB): buffers of 128 KiB and more (sink batches, outbox reads) are mapped and
    // unmapped whole instead of fragmenting the arenas under an alert flood.
    // SAFETY: as above.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
    // Freeing a block at an arena's top otherwise hands everything past 128 KiB back at once
    // (madvise, and a TLB shootdown on every CPU running the daemon): the ledger writer did
    // that after nearly every group at 5,000 grants/s (a sixth of the mint's CPU). Free
    // memory is still handed back by the periodic malloc_trim below.
    // SAFETY: as above.
    unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, 8 * 1024 * 1024) };
    raise_nofile();
    make_dir(&cfg.runtime_dir, 0o755)?;
    make_dir(&cfg.state_dir, 0o700)?;
    let _lock = lock::acquire(&cfg.runtime_dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run_async(setup))
}

async fn run_async(setup: Setup) -> Result<()> {
    let started = Instant::now();
    let cfg = setup.config.clone();
    let (mut kernel, rings) = Kernel::load(&setup.cgroup_root, &cfg.pin_dir, cfg.file_backend)?;
    let lsm = kernel.file_backend == "bpf-lsm";
    if !kernel.file_backend_note.is_empty() {
        tracing::info!("secret opens: fanotify ({})", kernel.file_backend_note);
    }
    if kernel.adopted {
        tracing::info!(pin_dir = %cfg.pin_dir.display(), "adopted the previous daemon's pinned maps: grants and holdings carried over");
    }
    let mut policy_maps = kernel.policy_maps()?;
    // SAFETY: each ring buffer owns its fd and it is neither closed nor replaced while
    // registered.
    let mut ring =
        unsafe { AsyncFd::register_with_interest(rings.events, tokio::io::Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("poll the ring buffer: {e}"))?;
    let mut alert_ring =
        unsafe { AsyncFd::register_with_interest(rings.alerts, tokio::io::Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("poll the alert ring buffer: {e}"))?;

    let mut table = ProcessTable::new(setup.cgroup_mount.clone());
    table.fingerprint_key = Some(crate::proc::env::load_key(&cfg.state_dir)?);
    // Lineage is attached: from here no process is missed; seed the ones already running.
    table.seed_from_proc();

    let mut watch = SecretWatch::new(lsm)?;
    watch.set_secrets(&cfg.secrets);
    let mut lsm_maps = match lsm {
        true => {
            let mut m = kernel.lsm_maps()?;
            m.set_scope(
                std::fs::metadata(&setup.cgroup_root)?.ino(),
                scope_level(&setup.cgroup_scope),
            )?;
            Some(m)
        }
        false => None,
    };
    // SAFETY: an owned duplicate of the fanotify fd, kept open while registered.
    let fan = unsafe {
        AsyncFd::register_with_interest(
            watch.fd().try_clone_to_owned()?,
            tokio::io::Interest::READABLE,
        )
    }
    .map_err(|e| anyhow::anyhow!("poll fanotify: {e}"))?;
    // SAFETY: an owned duplicate of the inotify fd, kept open while registered.
    let dirs = unsafe {
        AsyncFd::register_with_interest(
            watch.dir_fd().try_clone_to_owned()?,
            tokio::io::Interest::READABLE,
        )
    }
    .map_err(|e| anyhow::anyhow!("poll inotify: {e}"))?;

    // Grants: signing key and ledger under the state dir, kernel maps from the object;
    // grants that survived a restart are written back before anything is served. Slow
    // work (index file, DNS, ledger reads) is done before the registry exists.
    let (changes_tx, mut changes) = tokio::sync::mpsc::unbounded_channel();
    let signer = Signer::load_or_create(&cfg.state_dir)?;
    let mut ledger = Ledger::open(&cfg.state_dir)?;
    let policy = Arc::new(cfg.clone());
    let mut index = SecretIndex::load(&cfg.state_dir);
    index.assign(&policy)?;
    let secret_nets = resolve_secret_nets(&policy);
    let restore = RestoreInput::load(&mut ledger, kernel.adopted)?;
    let ledger = Arc::new(Mutex::new(ledger));
    let ledger_tx = LedgerTx::spawn(ledger.clone(), changes_tx);
    let grant_maps = kernel.grant_maps()?;
    let act_maps = grant_maps.act_maps()?;
    let own_maps = grant_maps.act_maps()?;
    let delivery_maps = grant_maps.act_maps()?;
    let spiffe_maps = grant_maps.act_maps()?;
    let dns_procs = grant_maps.act_maps()?;
    let facts = PolicyFacts {
        config: policy.clone(),
        secret_bits: Arc::new(index.by_name.clone()),
        secret_nets: Default::default(),
    };
    let view = Arc::new(ViewCell::new(GrantView::new(facts.clone())));
    let registry = Arc::new(Mutex::new(Registry::new(
        grant_maps,
        ledger_tx.clone(),
        signer,
        format!("enforcer@{}", setup.host),
        facts,
        view.clone(),
    )));
    lock(&registry).set_policy(policy.clone(), index.by_name.clone(), secret_nets)?;
    policy_maps.apply(&cfg, &index, &mut table.cgroups)?;
    sync_lsm(&mut lsm_maps, &watch, &index, None);
    let (restored, expired_while_down) = lock(&registry).restore(kernel.adopted, restore)?;
    // Without pins, running processes lost their agent flag and taint: written back from
    // /proc and the event store before anything is served or READY is reported.
    let rebuilt = if kernel.adopted {
        adopt::Restored::default()
    } else {
        adopt::restore_processes(&cfg, &setup.cgroup_mount, &index.by_name, &own_maps)
    };
    let (sweep_stats, sweeper) = adopt::spawn_sweeper(own_maps);
    // Fork, exit and revoke notices reach the registry off the decision path.
    let (notices_tx, notices) = tokio::sync::mpsc::unbounded_channel();
    let inbox = tokio::spawn(registry_inbox(registry.clone(), notices));
    // Loading parsed the kernel's whole BTF (tens of MB of heap, now freed): give it back
    // to the OS so the daemon's resident size reflects what it keeps.
    unsafe { libc::malloc_trim(0) };

    let store = EventStore::open(&cfg.state_dir)?;
    // Sinks deliver from the event store (the durable outbox) from their own cursors.
    let sinks = crate::alert::spawn(&cfg, &cfg.state_dir, &setup.host)?;
    let sink_metrics = sinks.metrics();
    let (cred_tx, mut cred_rx) = tokio::sync::mpsc::unbounded_channel();
    let broker =
        Arc::new(crate::aws::Broker::new(cfg.aws.clone(), &cfg.runtime_dir, cred_tx.clone()));
    let delivery = api::credentials::Delivery {
        maps: delivery_maps,
        view: view.clone(),
        broker: broker.clone(),
        notices: cred_tx,
    };
    let links_view = view.clone();
    // The DNS stub: bound and serving before the kernel steers port 53 to it.
    let (stub, stub_task, mut dns_rx) =
        start_dns(&cfg, &mut kernel, view.clone(), dns_procs).await?;
    let links = GrantLinks {
        view,
        act: Actor::new(act_maps, notices_tx.clone()),
        notices: notices_tx,
        ledger: ledger_tx.clone(),
    };
    let mut engine = Engine::new(
        table,
        store,
        cfg.mode,
        setup.host.clone(),
        setup.cgroup_scope.clone(),
        links,
        cfg.limits.exe_hash_max_bytes,
    );
    engine.secret_kinds = cfg.secrets.iter().map(|s| (s.name.clone(), s.kind)).collect();
    engine.table.set_secret_literals(literals::of(&cfg.secrets));
    sync_lsm(&mut lsm_maps, &watch, &index, Some(&mut engine));
    engine.learned = stub.learned.clone();
    policy_maps.set_dns_stub(stub.config_word())?;

    let limiter = match cfg.mint_rate_per_second {
        0 => RateLimiter::new(f64::INFINITY, u32::MAX),
        r => RateLimiter::new(r as f64, r.saturating_mul(2)),
    };
    crate::mint::attest::set_exe_hash_max(cfg.limits.exe_hash_max_bytes);
    // Refused grant requests become events; bounded, a flood of refusals is counted, not queued.
    let (refusals_tx, mut refusals) = tokio::sync::mpsc::channel(1024);
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel(4);
    // Workload identity: JWT-SVIDs for grant holders, on <runtime_dir>/spiffe.sock.
    let (svid_tx, mut svid_events) = tokio::sync::mpsc::unbounded_channel();
    let spiffe = match &cfg.spiffe {
        Some(sc) => {
            let sp = crate::spiffe::Spiffe::new(
                sc.clone(),
                cfg.state_dir.clone(),
                links_view.clone(),
                spiffe_maps,
                registry.clone(),
                svid_tx,
            )?;
            crate::spiffe::start(sp.clone(), &cfg.runtime_dir)?;
            Some(sp)
        }
        None => {
            // A socket left by an earlier daemon would mislead `enforcer run`.
            let _ = std::fs::remove_file(cfg.runtime_dir.join(crate::spiffe::SOCKET_NAME));
            drop(spiffe_maps);
            None
        }
    };
    let api_state = Arc::new(ApiState {
        reload: reload_tx,
        sink_metrics,
        spiffe,
        status: Mutex::new(serde_json::Value::Null),
        mint: Arc::new(MintState::new(
            registry.clone(),
            ledger,
            ledger_tx.clone(),
            Arc::new(cfg.clone()),
            limiter,
            refusals_tx,
        )),
        delivery,
        conns: Default::default(),
    });
    let _ = api_state.mint.aws.set(broker.clone());
    // Token files of grants that survived the restart stay valid.
    let live: Vec<(String, String)> = api_state
        .delivery
        .view
        .load()
        .grants
        .values()
        .map(|g| (g.id.clone(), g.intent.clone()))
        .collect();
    broker.restore(&live);
    if cfg.intents.iter().any(|i| i.aws.is_some()) {
        crate::aws::endpoint::start(&api_state)?;
    }
    let status_ctx = status::Context {
        setup: &setup,
        started,
        kernel: &kernel,
        rebuilt: &rebuilt,
        sweep: &sweep_stats,
        dns: &stub,
    };
    *lock(&api_state.status) = status_ctx.render(&engine, &watch);

    let sock_path = cfg.runtime_dir.join(api::SOCKET_NAME);
    let _ = std::fs::remove_file(&sock_path);
    let listener = tokio::net::UnixListener::bind(&sock_path)
        .with_context(|| format!("bind {}", sock_path.display()))?;
    std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(group) = &cfg.socket_group {
        set_group(&sock_path, group)?;
    }
    let mut server = api::server::serve_on_own_runtime(listener, api_state.clone())?;

    engine.agent_event(
        "agent_started",
        "info",
        format!("enforcer {} started: mode {}, config {}, cgroup_root {}, {} programs attached, {restored} live grants restored, {expired_while_down} expired while down, {}", env!("CARGO_PKG_VERSION"), cfg.mode, cfg.source, setup.cgroup_root.display(), kernel.attached.len(), if kernel.adopted { "pinned maps adopted".to_string() } else { format!("no pins: {} running agent processes marked, taint of {} processes restored", rebuilt.agents_marked, rebuilt.taint_restored) }),
    );
    // What the restore recorded, announced once written.
    ledger_tx.barrier().await;
    while let Ok(c) = changes.try_recv() {
        engine.on_grant_change(c);
    }
    engine.flush();
    tracing::info!(mode = %cfg.mode, config = %cfg.source, cgroup_root = %setup.cgroup_root.display(), "enforcer ready");
    notify_ready();

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // The kernel wakes us only when a lot is pending (see submit_flags in the eBPF maps);
    // this bounds how long a record waits otherwise.
    let mut drain_tick = tokio::time::interval(Duration::from_millis(DRAIN_INTERVAL_MS));
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_drops = kernel.counters().ringbuf_drops;
    let mut last_state_full = kernel.counters().state_full;
    let mut last_alert_drops = kernel.counters().alert_drops;
    let mut ticks: u64 = 0;
    let mut trimmed_at: u64 = 0;
    let reason = loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain_ring(guard.get_inner_mut(), &mut engine);
                guard.clear_ready();
                engine.flush();
            }
            guard = alert_ring.readable_mut() => {
                let mut guard = guard?;
                // Lineage first, so the violator's exec is attributed; bounded, so a flood of
                // routine records cannot hold the alert back.
                drain_ring_max(ring.get_mut(), &mut engine, LINEAGE_BEFORE_ANSWER);
                drain_ring(guard.get_inner_mut(), &mut engine);
                guard.clear_ready();
                engine.flush();
            }
            guard = dirs.readable() => {
                let mut guard = guard?;
                if watch.dirs_changed() {
                    watch.refresh();
                    sync_lsm(&mut lsm_maps, &watch, &index, Some(&mut engine));
                }
                guard.clear_ready();
            }
            _ = drain_tick.tick() => {
                drain_ring(ring.get_mut(), &mut engine);
                drain_ring(alert_ring.get_mut(), &mut engine);
                engine.release_alerts(false);
                engine.flush();
            }
            Some(svid) = svid_events.recv() => {
                engine.on_svid(svid);
                while let Ok(s) = svid_events.try_recv() {
                    engine.on_svid(s);
                }
                engine.flush();
            }
            Some(r) = refusals.recv() => {
                engine.on_refusal(r);
                while let Ok(r) = refusals.try_recv() {
                    engine.on_refusal(r);
                }
                engine.release_alerts(false);
                engine.flush();
            }
            Some(n) = dns_rx.recv() => {
                drain_ring_max(ring.get_mut(), &mut engine, LINEAGE_BEFORE_ANSWER);
                engine.on_dns(n);
                while let Ok(n) = dns_rx.try_recv() {
                    engine.on_dns(n);
                }
                engine.flush();
            }
            Some(change) = changes.recv() => {
                // Lineage first, so the subject's records are in the table.
                drain_ring(ring.get_mut(), &mut engine);
                engine.on_grant_change(change);
                while let Ok(c) = changes.try_recv() {
                    engine.on_grant_change(c);
                }
                engine.flush();
            }
            guard = fan.readable() => {
                let mut guard = guard?;
                // Lineage first: the opener's exec record may still be in the ring.
                drain_ring_max(ring.get_mut(), &mut engine, LINEAGE_BEFORE_ANSWER);
                // Each opener waits in open() for our answer: its kernel state is stable.
                for pending in watch.read() {
                    let allow = if pending.received.elapsed() > FILE_DECISION_DEADLINE {
                        engine.on_file_open_late(pending.open.clone(), FILE_DECISION_DEADLINE)
                    } else {
                        engine.on_file_open(pending.open.clone())
                    };
                    watch.respond(pending, allow);
                }
                engine.release_alerts(false);
                guard.clear_ready();
                engine.flush();
            }
            Some(n) = cred_rx.recv() => {
                engine.on_credential_notice(n);
                while let Ok(n) = cred_rx.try_recv() {
                    engine.on_credential_notice(n);
                }
                engine.flush();
            }
            _ = tick.tick() => {
                broker.sweep(&api_state.delivery.view.load());
                engine.summarise_routine();
                ticks += 1;
                let written = engine.counts.events_total;
                if ticks.is_multiple_of(10) || written > trimmed_at + 10_000 {
                    trimmed_at = written;
                    // Hand freed heap back to the OS after bursts (sub-millisecond when idle;
                    // every second while events flow).
                    // SAFETY: malloc_trim only releases free memory.
                    unsafe { libc::malloc_trim(0) };
                }
                watch.refresh();
                sync_lsm(&mut lsm_maps, &watch, &index, Some(&mut engine));
                engine.purge();
                stub.learned.prune(crate::kernel::grants::boot_now_ns());
                notify_watchdog();
                for n in crate::alert::take_notices() {
                    engine.agent_event("alert_delivery_degraded", "high", n);
                }
                let counters = kernel.counters();
                if counters.alert_drops > last_alert_drops {
                    engine.agent_event("events_lost", "critical", format!("{} violation records lost (alert ring buffer full); the verdicts were applied in the kernel", counters.alert_drops - last_alert_drops));
                    last_alert_drops = counters.alert_drops;
                }
                let drops = counters.ringbuf_drops;
                if drops > last_drops {
                    engine.agent_event("events_lost", "high", format!("{} kernel records lost (ring buffer full)", drops - last_drops));
                    last_drops = drops;
                }
                let state_full = kernel.counters().state_full;
                if state_full > last_state_full {
                    engine.agent_event("events_lost", "critical", format!("{} processes started without the grants, taint or agent flag of their parent (PROC_GRANTS full)", state_full - last_state_full));
                    last_state_full = state_full;
                }
                engine.flush();
                let ctx = status::Context { setup: &setup, started, kernel: &kernel, rebuilt: &rebuilt, sweep: &sweep_stats, dns: &stub };
                *lock(&api_state.status) = ctx.render(&engine, &watch);
            }
            _ = sighup.recv() => {
                // logrotate: reopen file sinks.
                sinks.reopen_files();
                let _ = apply_reload(&setup, &registry, &mut index, &mut policy_maps, &mut engine, &mut watch, &api_state);
                sync_lsm(&mut lsm_maps, &watch, &index, Some(&mut engine));
                stub.enforce.store(engine.mode == crate::policy::Mode::Enforce, std::sync::atomic::Ordering::Relaxed);
                engine.flush();
                let ctx = status::Context { setup: &setup, started, kernel: &kernel, rebuilt: &rebuilt, sweep: &sweep_stats, dns: &stub };
                *lock(&api_state.status) = ctx.render(&engine, &watch);
            }
            Some(reply) = reload_rx.recv() => {
                let r = apply_reload(&setup, &registry, &mut index, &mut policy_maps, &mut engine, &mut watch, &api_state);
                sync_lsm(&mut lsm_maps, &watch, &index, Some(&mut engine));
                stub.enforce.store(engine.mode == crate::policy::Mode::Enforce, std::sync::atomic::Ordering::Relaxed);
                engine.flush();
                let ctx = status::Context { setup: &setup, started, kernel: &kernel, rebuilt: &rebuilt, sweep: &sweep_stats, dns: &stub };
                *lock(&api_state.status) = ctx.render(&engine, &watch);
                let _ = reply.send(r);
            }
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
        }
    };
    server.abort();
    inbox.abort();
    // No stub to answer: port 53 of judged processes is judged like any connect again
    // (a resolver outside the grants is out_of_intent) instead of steered to a closed port.
    let _ = policy_maps.set_dns_stub(0);
    stub_task.abort();
    sweeper.abort();
    let _ = std::fs::remove_file(&sock_path);
    drain_ring(ring.get_mut(), &mut engine);
    drain_ring(alert_ring.get_mut(), &mut engine);
    // Alerts still waiting for an exe hash or an environment read: a short grace, then
    // written without them.
    let grace = Instant::now() + Duration::from_millis(500);
    while engine.alerts_waiting() > 0 && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(10)).await;
        engine.release_alerts(false);
    }
    engine.release_alerts(true);
    engine.agent_event(
        "agent_stopped",
        "info",
        format!("enforcer stopping on {reason}; kernel programs stay attached and pinned under {} (connect decisions, expiry, taint, agent flags and fork inheritance keep running in the kernel; {}); `enforcer detach` removes them", cfg.pin_dir.display(), if lsm { "secret opens keep being judged by the BPF-LSM program" } else { "secret opens are not judged until a daemon runs again (fanotify backend)" }),
    );
    engine.flush();
    // Every grant record made so far is in the ledger before the process ends.
    ledger_tx.barrier().await;
    sinks.shutdown().await;
    drop(policy_maps);
    drop(engine);
    drop(api_state);
    drop(registry);
    // The pins stay: the next daemon adopts them (`enforcer detach` removes them).
    drop(kernel);
    tracing::info!("stopped on {reason}");
    Ok(())
}

/// Binds and starts the DNS stub (`crate::dns`); returns it, its task and its notices.
async fn start_dns(
    cfg: &Config,
    kernel: &mut Kernel,
    view: Arc<ViewCell>,
    procs: crate::kernel::grants::ActMaps,
) -> Result<(
    Arc<crate::dns::stub::Stub>,
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<crate::dns::DnsNotice>,
)> {
    use crate::dns::{learned::LearnedTable, resolv, stub};
    let maps = kernel.dns_maps()?;
    let learned = Arc::new(LearnedTable::new(Some(maps.learned)).with_send_dests(maps.dests));
    let upstream = resolv::upstream(
        cfg.dns.upstream.as_deref(),
        Path::new(resolv::RESOLV_CONF),
        Path::new(resolv::RESOLVED_UPSTREAM_CONF),
    );
    let sockets = stub::bind(cfg.dns.listen)
        .await
        .with_context(|| format!("dns: bind the stub on {} (UDP and TCP)", cfg.dns.listen))?;
    let local = sockets.udp.local_addr()?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let enforce = cfg.mode == crate::policy::Mode::Enforce;
    let mut s = stub::Stub::new(
        upstream.servers.clone(),
        &cfg.dns,
        enforce,
        local,
        learned,
        view,
        maps.steer,
        procs,
        tx,
    );
    s.upstream_source = upstream.source.clone();
    s.local6 = sockets.v6.as_ref().and_then(|(u, _)| u.local_addr().ok());
    if let Some(e) = &sockets.v6_error {
        s.notes.push(format!("the stub does not serve on [::1] ({e}): queries of judged processes to IPv6 resolvers are steered to ::ffff:127.0.0.1, which an IPV6_V6ONLY socket or an unconnected sendto on an IPv6 socket cannot reach (they fail closed)"));
    }
    // nss-resolve: judged processes' connects to resolved's varlink socket fail, so glibc
    // asks `dns` (port 53: the stub). Needs the IPC hooks' cgroup/connect_unix program.
    let ipc_backend = kernel.ipc.as_ref().map(|h| h.backend).unwrap_or("off");
    (s.nss_fallback, s.nss_resolve) = match cfg.dns.nss_resolve {
        crate::policy::NssResolve::Allow => (false, "allow".into()),
        crate::policy::NssResolve::Fallback if ipc_backend == "cgroup" => (true, "fallback".into()),
        crate::policy::NssResolve::Fallback => (
            false,
            format!(
                "fallback unavailable: needs the cgroup/connect_unix hook (Linux 6.7+); the IPC hooks are `{ipc_backend}`"
            ),
        ),
    };
    if upstream.servers.is_empty() {
        s.notes.push("no upstream resolver: [dns] upstream is empty and /etc/resolv.conf lists no nameserver; names in grants resolve to nothing (SERVFAIL)".into());
    }
    let nss = std::fs::read_to_string("/etc/nsswitch.conf").unwrap_or_default();
    let resolv_conf = std::fs::read_to_string(resolv::RESOLV_CONF).unwrap_or_default();
    let resolved_active = Path::new(crate::dns::RESOLVED_VARLINK).exists();
    s.notes.extend(crate::dns::host_notes(&nss, &resolv_conf, resolved_active, s.nss_fallback));
    for n in &s.notes {
        tracing::warn!("dns: {n}");
    }
    tracing::info!(listen = %local, upstream = ?upstream.servers, source = %upstream.source, "dns stub serving");
    let stub = Arc::new(s);
    let task = tokio::spawn(stub.clone().serve(sockets));
    Ok((stub, task, rx))
}

/// Applies fork, exit and revoke notices to the registry, and expires grants when due.
async fn registry_inbox(
    registry: Arc<Mutex<Registry>>,
    mut notices: tokio::sync::mpsc::UnboundedReceiver<Notice>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(DRAIN_INTERVAL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            n = notices.recv() => {
                let Some(n) = n else { break };
                let mut reg = lock(&registry);
                reg.apply(n);
                while let Ok(n) = notices.try_recv() {
                    reg.apply(n);
                }
            }
            _ = tick.tick() => lock(&registry).expire_if_due(chrono::Utc::now()),
        }
    }
}

/// Locks, carrying on past a panic elsewhere (the data stays consistent at every unlock).
/// BPF-LSM backend: names the watched secrets (inodes, and paths as directory + name) to
/// the kernel program, and gives the engine the directories' names for its records.
fn sync_lsm(
    maps: &mut Option<crate::kernel::lsm::LsmMaps>,
    watch: &SecretWatch,
    index: &SecretIndex,
    engine: Option<&mut Engine>,
) {
    let Some(maps) = maps else { return };
    let by_name: std::collections::HashMap<String, u32> =
        index.by_name.iter().map(|(n, i)| (n.clone(), *i)).collect();
    if let Err(e) = maps.sync(&watch.kernel_secrets(), &by_name) {
        tracing::error!("BPF-LSM secret maps: {e:#}");
    }
    if let Some(engine) = engine {
        engine.kernel_dirs = watch.kernel_dirs();
    }
}

/// Depth of `cgroup_root` below the cgroup2 root ("/" is 0).
fn scope_level(scope: &str) -> u32 {
    scope.split('/').filter(|c| !c.is_empty()).count() as u32
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn drain_ring(ring: &mut aya::maps::RingBuf<aya::maps::MapData>, engine: &mut Engine) {
    // Bounded per call so a flood cannot starve signal handling; the fd stays readable.
    drain_ring_max(ring, engine, 65_536)
}

fn drain_ring_max(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    engine: &mut Engine,
    max: usize,
) {
    for _ in 0..max {
        let Some(item) = ring.next() else { break };
        let rec = records::decode(&item);
        drop(item);
        engine.on_record(rec);
    }
    engine.env_pass();
}

/// Loads and validates the policy again, then applies it: kernel per-secret facts and
/// selectors first, the enforce switch last, then the secret watch. An invalid policy
/// changes nothing. Ok(source) or Err(why).
fn apply_reload(
    setup: &Setup,
    registry: &Arc<Mutex<Registry>>,
    index: &mut SecretIndex,
    policy_maps: &mut crate::kernel::policy::PolicyMaps,
    engine: &mut Engine,
    watch: &mut SecretWatch,
    api_state: &Arc<ApiState>,
) -> std::result::Result<String, String> {
    let applied = reload(setup).and_then(|new| {
        let arc = Arc::new(new.clone());
        // Index file and DNS first, without the registry lock.
        index.assign(&new)?;
        let nets = resolve_secret_nets(&new);
        lock(registry).set_policy(arc.clone(), index.by_name.clone(), nets)?;
        policy_maps.apply(&new, index, &mut engine.table.cgroups)?;
        *lock(&api_state.mint.config) = arc;
        if new.intents.iter().any(|i| i.aws.is_some()) {
            crate::aws::endpoint::start(api_state)?;
        }
        crate::mint::attest::set_exe_hash_max(new.limits.exe_hash_max_bytes);
        Ok(new)
    });
    match applied {
        Ok(new) => {
            watch.set_secrets(&new.secrets);
            engine.secret_kinds = new.secrets.iter().map(|s| (s.name.clone(), s.kind)).collect();
            engine.table.set_secret_literals(literals::of(&new.secrets));
            engine.mode = new.mode;
            tracing::info!("policy reloaded from {}", new.source);
            engine.agent_event(
                "policy_reloaded",
                "info",
                format!("policy reloaded from {} (mode {})", new.source, new.mode),
            );
            Ok(new.source)
        }
        Err(e) => {
            let msg = format!("{e:#}");
            tracing::error!("policy reload refused, keeping the current policy:\n{msg}");
            engine.agent_event(
                "policy_reload_failed",
                "medium",
                format!("reload refused, current policy kept: {msg}"),
            );
            Err(msg)
        }
    }
}

fn reload(setup: &Setup) -> Result<Config> {
    let cfg =
        crate::policy::load(setup.config_path.as_deref()).map_err(|d| anyhow::anyhow!("{d}"))?;
    if cfg.cgroup_root != setup.config.cgroup_root
        || cfg.runtime_dir != setup.config.runtime_dir
        || cfg.state_dir != setup.config.state_dir
    {
        bail!(
            "cgroup_root, runtime_dir and state_dir apply only at start; restart the daemon to change them"
        );
    }
    if cfg.aws != setup.config.aws {
        bail!("[aws] applies only at start; restart the daemon to change it");
    }
    if cfg.spiffe != setup.config.spiffe {
        bail!("[spiffe] applies only at start; restart the daemon to change it");
    }
    Ok(cfg)
}

fn set_group(path: &Path, group: &str) -> Result<()> {
    let g = nix::unistd::Group::from_name(group)?
        .with_context(|| format!("socket_group {group:?}: no such group"))?;
    nix::unistd::chown(path, None, Some(g.gid))
        .with_context(|| format!("chgrp {} {group}", path.display()))?;
    Ok(())
}

/// sd_notify READY=1 when started by systemd (NOTIFY_SOCKET set); a no-op otherwise.
fn notify_ready() {
    sd_notify(b"READY=1\nSTATUS=enforcer ready");
}

/// WATCHDOG=1 from the main loop's 1 s tick (WatchdogSec=30s in the unit): a stuck loop
/// stops the pings and systemd restarts the service.
fn notify_watchdog() {
    if std::env::var("WATCHDOG_USEC").is_err() {
        return;
    }
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return;
    }
    sd_notify(b"WATCHDOG=1");
}

fn sd_notify(msg: &[u8]) {
    let Ok(path) = std::env::var("NOTIFY_SOCKET") else { return };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let _ = if let Some(abstract_name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .and_then(|a| sock.send_to_addr(msg, &a))
    } else {
        sock.send_to(msg, &path)
    };
    let _ = std::io::stdout().flush();
}
