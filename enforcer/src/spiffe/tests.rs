//! Unit tests: keys (persist, rotate, bundle), JWT-SVID claims and validation, SPIFFE ID
//! templates and the `[spiffe]` config, audience choice.
use std::os::unix::fs::PermissionsExt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use chrono::{Duration, TimeZone, Utc};
use serde_json::Value;

use super::authz::{Entitlement, choose};
use super::jwt::{self, InvalidSvid, Issue};
use super::keys::{KeyRing, keys_path};
use crate::policy::{load_str, render_spiffe_id};

fn part(token: &str, i: usize) -> Value {
    let p = token.split('.').nth(i).unwrap();
    serde_json::from_slice(&B64.decode(p).unwrap()).unwrap()
}

fn issue(
    ring: &KeyRing,
    aud: &[&str],
    now: chrono::DateTime<Utc>,
    exp: chrono::DateTime<Utc>,
) -> String {
    let aud: Vec<String> = aud.iter().map(|s| s.to_string()).collect();
    jwt::issue(
        &ring.current,
        &Issue {
            spiffe_id: "spiffe://example.org/intent/deploy",
            audiences: &aud,
            issuer: "https://oidc.example.org",
            grant_id: "g_abc",
            intent: "deploy",
            now,
            expires_at: exp,
        },
    )
    .unwrap()
    .0
}

#[test]
fn keys_persist_private_and_rotate_with_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let mut ring = KeyRing::load_or_create(dir.path(), t0).unwrap();
    let md = std::fs::metadata(keys_path(dir.path())).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    let k1 = ring.current.kid.clone();
    assert_eq!(KeyRing::load_or_create(dir.path(), t0).unwrap().current.kid, k1, "reloaded");
    assert_eq!(ring.next_rotation(std::time::Duration::from_secs(60)), t0 + Duration::seconds(60));
    let jwks = ring.jwks();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
    let k = &jwks["keys"][0];
    assert_eq!((k["kty"].as_str(), k["crv"].as_str()), (Some("EC"), Some("P-256")));
    assert_eq!((k["use"].as_str(), k["alg"].as_str()), (Some("jwt-svid"), Some("ES256")));
    assert_eq!(k["kid"].as_str(), Some(k1.as_str()));
    assert_eq!(B64.decode(k["x"].as_str().unwrap()).unwrap().len(), 32);

    ring.rotate(dir.path(), t0 + Duration::seconds(60)).unwrap();
    let k2 = ring.current.kid.clone();
    assert_ne!(k1, k2);
    let kids: Vec<String> = ring.jwks()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kids, [k1.clone(), k2.clone()], "previous then current");
    let again = KeyRing::load_or_create(dir.path(), t0).unwrap();
    assert_eq!(
        (again.current.kid.as_str(), again.previous.as_ref().unwrap().kid.as_str()),
        (k2.as_str(), k1.as_str())
    );
    ring.rotate(dir.path(), t0 + Duration::seconds(120)).unwrap();
    assert!(ring.public_key(&k1).is_none(), "the key before the previous leaves the bundle");
    assert!(ring.public_key(&k2).is_some());
    assert_eq!(
        std::fs::metadata(keys_path(dir.path())).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // A key file others may read is refused, not used.
    std::fs::set_permissions(keys_path(dir.path()), std::fs::Permissions::from_mode(0o644))
        .unwrap();
    let e = KeyRing::load_or_create(dir.path(), t0).unwrap_err();
    assert!(format!("{e:#}").contains("0600"), "{e:#}");
}

#[test]
fn jwt_svid_form_and_claims() {
    let dir = tempfile::tempdir().unwrap();
    let ring = KeyRing::load_or_create(dir.path(), Utc::now()).unwrap();
    let now = Utc::now();
    let exp = now + Duration::seconds(90);
    let token = issue(&ring, &["sts.example.test", "b"], now, exp);
    let header = part(&token, 0);
    assert_eq!(header, serde_json::json!({"alg": "ES256", "kid": ring.current.kid, "typ": "JWT"}));
    let c = part(&token, 1);
    assert_eq!(c["sub"], "spiffe://example.org/intent/deploy");
    assert_eq!(c["aud"], serde_json::json!(["sts.example.test", "b"]));
    assert_eq!(c["iss"], "https://oidc.example.org");
    assert_eq!(c["grant_id"], "g_abc");
    assert_eq!(c["intent"], "deploy");
    assert_eq!(c["iat"].as_i64(), Some(now.timestamp()));
    assert_eq!(c["exp"].as_i64(), Some(exp.timestamp()));
    assert_eq!(c["jti"].as_str().unwrap().len(), 32);
    assert_eq!(B64.decode(token.split('.').nth(2).unwrap()).unwrap().len(), 64, "r || s");
    let other = issue(&ring, &["b"], now, exp);
    assert_ne!(part(&other, 1)["jti"], c["jti"], "jti is unique");

    let (id, claims) = jwt::validate(&ring, "example.org", &token, "b", now).unwrap();
    assert_eq!(id, "spiffe://example.org/intent/deploy");
    assert_eq!(claims["grant_id"], "g_abc");
    let s = jwt::to_struct(&claims);
    assert!(s.fields.contains_key("aud") && s.fields.contains_key("exp"));
}

#[test]
fn validation_refuses_what_it_must() {
    let dir = tempfile::tempdir().unwrap();
    let mut ring = KeyRing::load_or_create(dir.path(), Utc::now()).unwrap();
    let now = Utc::now();
    let token = issue(&ring, &["a"], now, now + Duration::seconds(60));
    let v = |ring: &KeyRing, t: &str, aud: &str, at| jwt::validate(ring, "example.org", t, aud, at);
    assert_eq!(v(&ring, &token, "x", now).unwrap_err(), InvalidSvid::Audience("x".into()));
    assert!(matches!(
        v(&ring, &token, "a", now + Duration::seconds(60)),
        Err(InvalidSvid::Expired(_))
    ));
    assert!(matches!(
        jwt::validate(&ring, "other.org", &token, "a", now),
        Err(InvalidSvid::Subject(..))
    ));
    // Claims swapped under the signature.
    let parts: Vec<&str> = token.split('.').collect();
    let mut c = part(&token, 1);
    c["sub"] = "spiffe://example.org/intent/admin".into();
    let forged = format!("{}.{}.{}", parts[0], B64.encode(c.to_string()), parts[2]);
    assert_eq!(v(&ring, &forged, "a", now).unwrap_err(), InvalidSvid::Signature);
    // alg none / HS256 are never accepted.
    for alg in ["none", "HS256", "EdDSA"] {
        let h = B64.encode(format!(r#"{{"alg":"{alg}","kid":"{}"}}"#, ring.current.kid));
        let t = format!("{h}.{}.{}", parts[1], parts[2]);
        assert_eq!(v(&ring, &t, "a", now).unwrap_err(), InvalidSvid::Alg(alg.into()));
    }
    assert!(matches!(v(&ring, "a.b", "a", now), Err(InvalidSvid::Malformed(_))));
    assert!(matches!(v(&ring, &"x".repeat(20_000), "a", now), Err(InvalidSvid::TooLarge(_))));
    // Another ring's key: unknown kid.
    let dir2 = tempfile::tempdir().unwrap();
    let ring2 = KeyRing::load_or_create(dir2.path(), now).unwrap();
    assert!(matches!(v(&ring2, &token, "a", now), Err(InvalidSvid::UnknownKid(_))));
    // One rotation: still valid (previous key); two: its key left the bundle.
    ring.rotate(dir.path(), now).unwrap();
    assert!(v(&ring, &token, "a", now).is_ok());
    ring.rotate(dir.path(), now).unwrap();
    assert!(matches!(v(&ring, &token, "a", now), Err(InvalidSvid::UnknownKid(_))));
}

#[test]
fn spiffe_ids_and_config() {
    assert_eq!(
        render_spiffe_id("example.org", None, "deploy", 0, 0),
        "spiffe://example.org/intent/deploy"
    );
    assert_eq!(
        render_spiffe_id("example.org", Some("/ci/{intent}/uid/{uid}/gid/{gid}"), "d", 1000, 50),
        "spiffe://example.org/ci/d/uid/1000/gid/50"
    );
    assert_eq!(
        render_spiffe_id("example.org", Some("spiffe://example.org/w/{intent}"), "d", 0, 0),
        "spiffe://example.org/w/d"
    );
    let base = "[spiffe]\ntrust_domain = \"example.org\"\n";
    let cfg = load_str(
        "t.toml",
        &format!("{base}[[intent]]\nname = \"deploy\"\naudiences = [\"sts.amazonaws.com\"]\n"),
    )
    .unwrap();
    let sp = cfg.spiffe.as_ref().unwrap();
    assert_eq!(sp.trust_domain, "example.org");
    assert_eq!(sp.issuer, "https://example.org");
    assert_eq!(sp.key_rotation, crate::policy::DEFAULT_KEY_ROTATION);
    assert_eq!(sp.svid_ttl, crate::policy::DEFAULT_SVID_TTL);
    assert_eq!(cfg.intents[0].audiences, ["sts.amazonaws.com"]);
    let cfg = load_str(
        "t.toml",
        "[spiffe]\ntrust_domain = \"example.org\"\noidc_listen = \"127.0.0.1:8443\"\nkey_rotation = \"1h\"\nsvid_ttl = \"10m\"\n",
    )
    .unwrap();
    let sp = cfg.spiffe.unwrap();
    assert_eq!(sp.issuer, "http://127.0.0.1:8443");
    assert_eq!(sp.svid_ttl, std::time::Duration::from_secs(600));

    let err = |text: &str| load_str("t.toml", text).unwrap_err().to_string();
    let e = err("[spiffe]\ntrust_domain = \"Example.org\"\n");
    assert!(e.contains("t.toml:2:16") && e.contains("invalid trust_domain"), "{e}");
    let e = err(&format!("{base}key_rotation = \"1m\"\nsvid_ttl = \"5m\"\n"));
    assert!(e.contains("t.toml:3:") && e.contains("shorter than svid_ttl"), "{e}");
    let e = err(&format!("{base}oidc_listen = \"0.0.0.0:8443\"\n"));
    assert!(e.contains("not a loopback address"), "{e}");
    let e = err(&format!("{base}oidc_listen = \"127.0.0.1:1\"\noidc_tls_cert = \"/c.pem\"\n"));
    assert!(e.contains("go together"), "{e}");
    let e = err(&format!("{base}issuer = \"ftp://x\"\n"));
    assert!(e.contains("invalid issuer"), "{e}");
    let e = err(&format!("{base}svid_lifetime = \"1m\"\n"));
    assert!(e.contains("unknown field") && e.contains("svid_lifetime"), "{e}");
    let intent = |extra: &str| format!("{base}[[intent]]\nname = \"deploy\"\n{extra}\n");
    let e = err(&intent("spiffe_id = \"/ci/{job}\""));
    assert!(e.contains("t.toml:5:13") && e.contains("unknown placeholder"), "{e}");
    let e = err(&intent("spiffe_id = \"/ci/../x\""));
    assert!(e.contains("invalid spiffe_id"), "{e}");
    let e = err(&intent("spiffe_id = \"spiffe://other.org/x\""));
    assert!(e.contains("trust domain `other.org`"), "{e}");
    let e = err(&intent("audiences = [\"\"]"));
    assert!(e.contains("invalid audience"), "{e}");
    let ok = load_str("t.toml", &intent("spiffe_id = \"spiffe://example.org/ci/{intent}/{uid}\""))
        .unwrap();
    assert_eq!(ok.intents[0].spiffe_id.as_deref(), Some("spiffe://example.org/ci/{intent}/{uid}"));
}

#[test]
fn audience_choice() {
    let ent = |id: &str, grant: &str, auds: &[&str], secs: i64| Entitlement {
        grant_id: grant.into(),
        intent: "i".into(),
        spiffe_id: id.into(),
        audiences: auds.iter().map(|s| s.to_string()).collect(),
        expires_at: Utc.timestamp_opt(1_000 + secs, 0).unwrap(),
    };
    let held = [
        ent("spiffe://t/a", "g1", &["x", "y"], 10),
        ent("spiffe://t/a", "g2", &["x", "y"], 20),
        ent("spiffe://t/b", "g3", &["x"], 30),
    ];
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let got: Vec<&str> =
        choose(&held, &s(&["x"]), None).iter().map(|e| e.grant_id.as_str()).collect();
    assert_eq!(got, ["g2", "g3"], "one per SPIFFE ID, the longest-lived grant");
    let got: Vec<&str> =
        choose(&held, &s(&["x", "y"]), None).iter().map(|e| e.grant_id.as_str()).collect();
    assert_eq!(got, ["g2"], "every audience must be allowed");
    assert!(choose(&held, &s(&["z"]), None).is_empty());
    let got: Vec<&str> = choose(&held, &s(&["x"]), Some("spiffe://t/b"))
        .iter()
        .map(|e| e.grant_id.as_str())
        .collect();
    assert_eq!(got, ["g3"]);
    assert!(choose(&held, &s(&["x"]), Some("spiffe://t/c")).is_empty());
}
