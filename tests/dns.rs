//! Destinations by name (issue 15): the daemon's per-grant DNS stub. A real DNS server
//! (tests/data/dns_server.py) on a host in a network namespace this test creates
//! (`enforcer_tests::dns_net`) answers names whose addresses change between queries, with short
//! TTLs, a CNAME chain and a wildcard zone; a TCP echo listener there takes the connections.
//! The daemon's `[dns] upstream` is that server. Granted processes (python, in the test cgroup,
//! under `enforcer run --intent`) query 127.0.0.1:53 (no resolver listens there: only the
//! stub, through the kernel's steering, can answer) and connect.
use std::process::Command;
use std::time::Duration;

use enforcer::event::Event;
use enforcer_tests::dns_net::{
    ECHO_PORT, PRELUDE, TestNet, connects, has, run_granted, start, start_with,
};
use enforcer_tests::env::{python, root_or_skip};
use enforcer_tests::events::EventExt;

#[test]
fn names_learned_per_grant_enforce() {
    if !root_or_skip("names_learned_per_grant_enforce") {
        return;
    }
    let net = TestNet::create();
    let (cg, daemon) = start("dns-enforce", "enforce", &net, "");
    let a = |n: u8| net.addr(n);
    let body = format!(
        r#"
r, addrs, src = q("api.dns.test")
assert src == ("127.0.0.1", 53), src   # the reply reads as coming from the resolver asked
conn(addrs[0])
conn("{hard}")                         # hard-coded, never answered
r, addrs, _ = q("alias.dns.test")       # CNAME chain: alias -> edge.cdn.test -> A
conn(addrs[0])
r, addrs, _ = q("x1.wild.test")         # wildcard destination
conn(addrs[0])
r, first, _ = q("rot.dns.test")        # the address changes with every query
conn(first[0])
conn("{rot2}")                          # not answered yet
r, second, _ = q("rot.dns.test")
conn(second[0])
q("outside.test")                       # no grant names it
r, addrs, _ = q("api.dns.test", tcp=True)
print("tcp", addrs, flush=True)
r, addrs, _ = q("short.dns.test")       # TTL 1 s, min_ttl 1 s
live = conn(addrs[0])
time.sleep(2.5)
echo(live)                              # opened in the window: still carries data
conn(addrs[0])                          # a new connect after the TTL
q("short.dns.test")
conn(addrs[0])                          # re-resolved: allowed again
"#,
        hard = a(17),
        rot2 = a(12),
    );
    let (pid, lines) = run_granted(&cg, &daemon, &body);
    let want = [
        format!("q api.dns.test rcode=0 addrs={} from=127.0.0.1:53", a(10)),
        format!("conn {} ok", a(10)),
        format!("conn {} EPERM", a(17)),
        format!("q alias.dns.test rcode=0 addrs={} from=127.0.0.1:53", a(13)),
        format!("conn {} ok", a(13)),
        format!("conn {} ok", a(14)),
        format!("q rot.dns.test rcode=0 addrs={} from=127.0.0.1:53", a(11)),
        format!("conn {} ok", a(11)),
        format!("conn {} EPERM", a(12)),
        format!("q rot.dns.test rcode=0 addrs={} from=127.0.0.1:53", a(12)),
        format!("conn {} ok", a(12)),
        "q outside.test rcode=5 addrs= from=127.0.0.1:53".to_string(),
        format!("tcp ['{}']", a(10)),
        "echo ping".to_string(),
    ];
    for w in &want {
        assert!(has(&lines, w), "missing {w:?} in {lines:#?}\nlog:\n{}", daemon.log());
    }
    // The short-TTL address: allowed, denied after the TTL, allowed after re-resolution.
    let short: Vec<&String> =
        lines.iter().filter(|l| l.starts_with(&format!("conn {} ", a(15)))).collect();
    assert_eq!(
        short,
        [
            &format!("conn {} ok", a(15)),
            &format!("conn {} EPERM", a(15)),
            &format!("conn {} ok", a(15))
        ],
        "{lines:#?}"
    );
    // The resolver never saw the refused name: refused without forwarding.
    let seen = net.queries();
    assert!(!seen.iter().any(|l| l.starts_with("outside.test")), "{seen:?}");
    assert!(
        seen.iter().any(|l| l == "api.dns.test 1 tcp"),
        "TCP query forwarded over TCP: {seen:?}"
    );

    // Events: allowed connects name the DNS name; the hard-coded address is out_of_intent.
    let ok = connects(&daemon, pid, a(10));
    assert!(
        ok.iter()
            .all(|e| e.verdict == "allowed" && e.dest().name.as_deref() == Some("api.dns.test")),
        "{ok:#?}"
    );
    let chain = connects(&daemon, pid, a(13));
    assert_eq!(chain[0].dest().name.as_deref(), Some("alias.dns.test"), "{chain:#?}");
    let hard = connects(&daemon, pid, a(17));
    assert_eq!((hard[0].verdict.as_str(), hard[0].action.as_str()), ("out_of_intent", "denied"));
    assert_eq!(hard[0].dest().name, None);
    let refused =
        daemon.one_event("dns refused", |e: &Event| e.kind == "dns" && e.process.pid == pid);
    assert_eq!((refused.verdict.as_str(), refused.action.as_str()), ("out_of_intent", "denied"));
    assert_eq!(refused.dest().name.as_deref(), Some("outside.test"));
    assert_eq!((refused.dest().ip.as_str(), refused.dest().port), ("127.0.0.1", 53));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let st = loop {
        let st = daemon.status_json();
        if st["dns"]["refused"].as_u64() >= Some(1) || std::time::Instant::now() > deadline {
            break st;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(st["dns"]["refused"].as_u64() >= Some(1), "{st:#}");
    assert_eq!(st["dns"]["upstream"][0], format!("{}:53", a(2)));
    daemon.assert_no_decision_mismatches();
}

#[test]
fn names_outside_grants_alerted_in_monitor() {
    if !root_or_skip("names_outside_grants_alerted_in_monitor") {
        return;
    }
    let net = TestNet::create();
    let (cg, daemon) = start("dns-monitor", "monitor", &net, "");
    let (pid, lines) = run_granted(&cg, &daemon, "r, addrs, _ = q('outside.test')\nconn(addrs[0])");
    let a16 = net.addr(16);
    assert!(
        has(&lines, &format!("q outside.test rcode=0 addrs={a16} from=127.0.0.1:53")),
        "{lines:?}"
    );
    assert!(has(&lines, &format!("conn {a16} ok")), "{lines:?}");
    let e = daemon.one_event("dns alert", |e: &Event| e.kind == "dns" && e.process.pid == pid);
    assert_eq!((e.verdict.as_str(), e.action.as_str()), ("out_of_intent", "alerted"));
    assert_eq!(e.dest().name.as_deref(), Some("outside.test"));
    let c = connects(&daemon, pid, a16);
    assert_eq!((c[0].verdict.as_str(), c[0].action.as_str()), ("out_of_intent", "alerted"));
}

/// The attacker's moves: ask the stub directly (not steered: no attribution), or get
/// answers for a name outside the grant with `refuse = "nxdomain"`.
#[test]
fn unsteered_queries_and_nxdomain() {
    if !root_or_skip("unsteered_queries_and_nxdomain") {
        return;
    }
    let net = TestNet::create();
    let (cg, daemon) = start("dns-unsteered", "enforce", &net, "refuse = \"nxdomain\"");
    let listen = daemon.status_json()["dns"]["listen"].as_str().unwrap().to_string();
    let (host, port) = listen.rsplit_once(':').unwrap();
    // A process of the test (no grant, outside the cgroup) sends straight to the stub.
    let script = format!(
        "{PRELUDE}\nq('api.dns.test', server=('{host}', {port}))\nq('api.dns.test', tcp=True, server=('{host}', {port}))"
    );
    let out = Command::new(python()).args(["-c", &script, "0"]).output().unwrap();
    let lines: Vec<String> =
        String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
    assert!(has(&lines, &format!("q api.dns.test rcode=5 addrs= from={host}:{port}")), "{lines:?}");
    assert_eq!(lines.iter().filter(|l| l.contains("rcode=5")).count(), 2, "{lines:?}");
    assert!(
        net.queries().is_empty(),
        "an unattributed query reached the resolver: {:?}",
        net.queries()
    );
    // A granted process: names outside its grant get NXDOMAIN.
    let (_, lines) = run_granted(&cg, &daemon, "q('outside.test')");
    assert!(has(&lines, "q outside.test rcode=3 addrs= from=127.0.0.1:53"), "{lines:?}");
    // The status is refreshed once a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let st = daemon.status_json();
        if st["dns"]["unattributed"].as_u64() >= Some(2) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "unattributed not counted: {st:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One daemon (enforce, `refuse = "off"`) for the rest of the contract:
/// - a secret whose own destinations are given by name: the process that read it resolves
///   (its queries reach the stub), connects and sends where the name was learned, with no
///   `send` violation (the false positive of issue 15's first landing);
/// - resolver addresses other than 127.0.0.1:53: the namespace server's own address (UDP and
///   TCP) and an address where nothing listens are answered by the stub;
/// - IPv6: AAAA queries to [::1]:53 over connected UDP, unconnected sendto (sendmsg6), an
///   IPV6_V6ONLY socket and TCP, and to the namespace's IPv6 address, are answered by the
///   stub on [::1] (the reply reads as coming from the resolver asked); the answer is
///   learned, a connection to it carries data, an address never answered is EPERM;
/// - `refuse = "off"`: a name outside the grant is forwarded and answered, alerted as a
///   `dns` event naming it and the resolver asked, and its address is still not usable.
#[test]
fn secret_names_other_resolvers_ipv6_refuse_off() {
    if !root_or_skip("secret_names_other_resolvers_ipv6_refuse_off") {
        return;
    }
    let net = TestNet::create();
    // The secret's directory is watched: keep it apart from everything the process runs.
    let secret_dir = tempfile::tempdir().unwrap();
    let key = secret_dir.path().join("key");
    std::fs::write(&key, "named-secret-value\n").unwrap();
    let secrets = format!(
        "[[secret]]\nname = \"key\"\npaths = [\"{}\"]\ndestinations = [\"api.dns.test:{ECHO_PORT}\"]\n",
        key.display()
    );
    let (cg, daemon) = start_with(
        "dns-contract",
        "enforce",
        &net,
        "refuse = \"off\"",
        &secrets,
        "secrets = [\"key\"]",
    );
    let a = |n: u8| net.addr(n);
    let v6 = |last: u8| format!("{}::{last}", net.base6);
    let body = format!(
        r#"
open("{key}").read()                    # tainted by the secret from here on
r, addrs, _ = q("api.dns.test")
s = conn(addrs[0]); echo(s)
r, addrs, _ = q("api.dns.test", server=("{a2}", 53))
r, addrs, _ = q("api.dns.test", tcp=True, server=("{a2}", 53))
r, addrs, _ = q("api.dns.test", server=("{a99}", 53))
r, addrs, _ = q("api.dns.test", server=("::1", 53), qtype=28, connected=True)
s6 = conn(addrs[0]); echo(s6)
conn("{v6_11}")                          # never answered
r, addrs, _ = q("api.dns.test", tcp=True, server=("::1", 53), qtype=28)
q("api.dns.test", server=("::1", 53), qtype=28)                 # unconnected sendto (sendmsg6)
q("api.dns.test", server=("::1", 53), qtype=28, v6only=True)    # IPV6_V6ONLY
q("api.dns.test", server=("{v6_53}", 53), qtype=28)              # an IPv6 resolver address
q("api.dns.test", server=("{v6_53}", 53), qtype=28, connected=True, v6only=True)
q("api.dns.test", tcp=True, server=("{v6_53}", 53), qtype=28)
r, addrs, _ = q("outside.test", server=("{a2}", 53))
conn(addrs[0])
"#,
        key = key.display(),
        a2 = a(2),
        a99 = a(99),
        v6_11 = v6(11),
        v6_53 = v6(53),
    );
    let (pid, lines) = run_granted(&cg, &daemon, &body);
    let (a2, a10, a16) = (a(2), a(10), a(16));
    let want = [
        format!("q api.dns.test rcode=0 addrs={a10} from=127.0.0.1:53"),
        format!("conn {a10} ok"),
        "echo ping".to_string(),
        format!("q api.dns.test rcode=0 addrs={a10} from={a2}:53"),
        format!("q api.dns.test rcode=0 addrs={a10} from={}:53", a(99)),
        format!("q api.dns.test rcode=0 addrs={} from=::1:53", v6(10)),
        format!("conn {} ok", v6(10)),
        format!("conn {} EPERM", v6(11)),
        format!("q outside.test rcode=0 addrs={a16} from={a2}:53"),
        format!("conn {a16} EPERM"),
    ];
    for w in &want {
        assert!(has(&lines, w), "missing {w:?} in {lines:#?}\nlog:\n{}", daemon.log());
    }
    assert_eq!(lines.iter().filter(|l| *l == "echo ping").count(), 2, "{lines:#?}");
    // AAAA to [::1]:53 over connected UDP, TCP, unconnected sendto and IPV6_V6ONLY; to the
    // namespace's IPv6 address over unconnected and connected V6ONLY UDP and TCP.
    let aaaa = |from: &str| format!("q api.dns.test rcode=0 addrs={} from={from}:53", v6(10));
    let count = |want: String| lines.iter().filter(|l| **l == want).count();
    assert_eq!(count(aaaa("::1")), 4, "AAAA to [::1]:53: {lines:#?}");
    assert_eq!(count(aaaa(&v6(53))), 3, "AAAA to an IPv6 resolver: {lines:#?}");
    assert!(!lines.iter().any(|l| l.contains(" error ")), "{lines:#?}");
    let seen = net.queries();
    assert!(seen.iter().any(|l| l == "api.dns.test 28 udp"), "AAAA forwarded: {seen:?}");
    assert!(seen.iter().any(|l| l == "outside.test 1 udp"), "refuse off forwards: {seen:?}");
    // The name outside the grant: alerted (not refused), naming the resolver asked.
    let e = daemon.one_event("dns alert", |e: &Event| e.kind == "dns" && e.process.pid == pid);
    assert_eq!((e.verdict.as_str(), e.action.as_str()), ("out_of_intent", "alerted"));
    assert_eq!(e.dest().name.as_deref(), Some("outside.test"));
    assert_eq!((e.dest().ip.as_str(), e.dest().port), (a2.as_str(), 53));
    // Connects to learned addresses name the DNS name, over IPv6 too.
    let c6 = connects(&daemon, pid, v6(10));
    assert_eq!(
        (c6[0].verdict.as_str(), c6[0].dest().name.as_deref()),
        ("allowed", Some("api.dns.test"))
    );
    // No send of the tainted process was judged a violation (the DNS queries and the data
    // to the learned addresses), and the kernel and the daemon agree on every record.
    std::thread::sleep(Duration::from_millis(500));
    let sends: Vec<Event> =
        daemon.events().into_iter().filter(|e| e.kind == "send" && e.process.pid == pid).collect();
    assert!(sends.is_empty(), "send violations: {sends:#?}");
    daemon.assert_no_decision_mismatches();
    named_in_ocsf_and_census(&daemon, pid, &a10, &v6(11));
}

/// What a SIEM and a platform team read of the same run: the OCSF rendering of the connect to
/// the learned address carries the name as `dst_endpoint.hostname` (the unanswered address
/// none), and the census reports and proposes the secret's destination by name, not address.
fn named_in_ocsf_and_census(
    daemon: &enforcer_tests::daemon::Daemon,
    pid: u32,
    learned: &str,
    unnamed: &str,
) {
    let state = daemon.state_dir();
    let state = state.to_str().unwrap();
    let out = daemon.cli(&["events", "--format", "ocsf", "--state-dir", state]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ocsf: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Network Activity (an allowed connect) carries `dst_endpoint`; a Detection Finding (the
    // denied one) carries it in its evidence.
    let endpoint = |o: &serde_json::Value| -> serde_json::Value {
        match &o["dst_endpoint"] {
            serde_json::Value::Null => o["evidences"][0]["dst_endpoint"].clone(),
            d => d.clone(),
        }
    };
    let to = |ip: &str| -> Vec<serde_json::Value> {
        ocsf.iter()
            .filter(|o| o["unmapped"]["kind"] == "connect" && o["actor"]["process"]["pid"] == pid)
            .map(endpoint)
            .filter(|d| d["ip"] == ip)
            .collect()
    };
    let named = to(learned);
    assert!(!named.is_empty(), "no OCSF connect to {learned}: {ocsf:#?}");
    assert!(named.iter().all(|d| d["hostname"] == "api.dns.test"), "{named:#?}");
    let bare = to(unnamed);
    assert!(!bare.is_empty(), "no OCSF connect to {unnamed}: {ocsf:#?}");
    assert!(bare.iter().all(|d| d["hostname"].is_null()), "{bare:#?}");

    let out = daemon.cli(&["report", "census", "--format", "json", "--state-dir", state]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = c["credentials"].as_array().unwrap().iter().find(|x| x["name"] == "key");
    let key = key.unwrap_or_else(|| panic!("no secret `key` in the census: {c:#}"));
    let by_name = format!("api.dns.test:{ECHO_PORT}");
    let d = key["destinations"].as_array().unwrap().iter().find(|d| d["ip"] == learned);
    let d = d.unwrap_or_else(|| panic!("no destination {learned}: {key:#}"));
    assert_eq!(d["destination"], by_name.as_str(), "{key:#}");
    assert_eq!(d["names"], serde_json::json!(["api.dns.test"]), "{key:#}");
    let proposed = key["proposal"]["destinations"].as_array().unwrap();
    assert!(proposed.iter().any(|p| p == by_name.as_str()), "{key:#}");
    assert!(!proposed.iter().any(|p| p.as_str().is_some_and(|p| p.contains(learned))), "{key:#}");
}
