use std::path::PathBuf;
use std::process::ExitCode;

use crate::api;

/// Where the daemon's socket is: the flag, else $ENFORCER_RUNTIME_DIR, else the installed
/// config's runtime_dir, else /run/enforcer.
pub fn runtime_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("ENFORCER_RUNTIME_DIR").map(PathBuf::from)).unwrap_or_else(
        || {
            crate::policy::load(None)
                .map(|c| c.runtime_dir)
                .unwrap_or_else(|_| PathBuf::from("/run/enforcer"))
        },
    )
}

pub fn socket() -> PathBuf {
    runtime_dir(None).join(api::SOCKET_NAME)
}

pub fn run(json: bool, runtime_dir_flag: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let sock = runtime_dir(runtime_dir_flag).join(api::SOCKET_NAME);
    let v = match api::client::request(&sock, "GET", "/v1/status", None) {
        Ok((200, v)) => v,
        Ok((code, v)) => {
            eprintln!("enforcer: daemon at {} answered {code}: {v}", sock.display());
            return Ok(ExitCode::from(1));
        }
        Err(e) => {
            eprintln!("enforcer: no daemon answering: {e:#}");
            return Ok(ExitCode::from(1));
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let g = |p: &str| {
        v.pointer(p).map(|x| x.to_string().trim_matches('"').to_string()).unwrap_or_default()
    };
    println!(
        "enforcer {} running (pid {}, up {} s) on {}",
        g("/version"),
        g("/pid"),
        g("/uptime_s"),
        g("/host")
    );
    println!("  mode           {}", g("/mode"));
    println!("  config         {}", g("/config"));
    println!("  cgroup_root    {}", g("/cgroup_root"));
    println!("  backends       lineage: {}", g("/backends/process_lineage"));
    println!("                 connect: {}", g("/backends/connect"));
    println!("                 socket:  {}", g("/backends/socket_create"));
    println!("                 file:    {}", g("/backends/file_open"));
    let programs: Vec<&str> = v["programs"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p.as_str()).collect())
        .unwrap_or_default();
    println!("  programs       {} ({})", programs.len(), programs.join(", "));
    println!("  live grants    {}", g("/live_grants"));
    println!(
        "  secrets        {} defined, {} paths watched, {} missing",
        g("/secrets/defined"),
        g("/secrets/paths_watched"),
        g("/secrets/paths_missing")
    );
    println!("  events         {} ({} alerts)", g("/events_total"), g("/alerts_total"));
    println!(
        "  kernel drops   {} ring buffer, {} fanotify overflows",
        g("/kernel/ringbuf_drops"),
        g("/fanotify_overflows")
    );
    if let Some(fo) = v["fail_open"].as_array() {
        println!("  fails open when the daemon is gone:");
        for f in fo {
            println!("    - {}", f.as_str().unwrap_or_default());
        }
    }
    Ok(ExitCode::SUCCESS)
}
