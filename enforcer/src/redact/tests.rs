//! Redaction tests, adversarial ones included.
use super::*;

const KEY: &[u8] = b"test-key-0123456789abcdef0123456";
const GHP: &str = "ghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A";

fn r() -> Redactor {
    Redactor::new(KEY)
}

fn red(s: &str) -> String {
    r().redact(s).into_owned()
}

fn argv(a: &[&str]) -> Vec<String> {
    r().redact_argv(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>(), false)
}

fn fp(v: &str) -> String {
    r().marker(v.as_bytes())
}

#[track_caller]
fn gone(out: &str, secret: &str) {
    assert!(!out.contains(secret), "{secret:?} still in {out:?}");
    assert!(out.contains(MARKER_PREFIX), "no marker in {out:?}");
}

#[track_caller]
fn same(s: &str) {
    assert_eq!(red(s), s);
}

#[test]
fn marker_is_the_prefix_of_the_env_fingerprint() {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(KEY).unwrap();
    mac.update(b"hunter2hunter2");
    let env_fp = hex::encode(&mac.finalize().into_bytes()[..8]);
    assert_eq!(fp("hunter2hunter2"), format!("[redacted:{}]", &env_fp[..8]));
    // Keyed: another key, another fingerprint.
    assert_ne!(Redactor::new(b"other").marker(b"hunter2hunter2"), fp("hunter2hunter2"));
}

#[test]
fn ordinary_command_lines_are_untouched() {
    for s in [
        "cat /root/.aws/credentials",
        "curl -s -m 5 http://127.0.0.1:8080/path?x=1&y=2",
        "python3 -c \"import sys; open(sys.argv[1]).read()\" /tmp/s \"two words\"",
        "ssh -p 22 git@github.com",
        "git clone ssh://git@github.com/org/repo.git",
        "mkdir -p build-output-directory",
        "gcc -pthread -pedantic -O2 main.c",
        "find . -print0",
        "docker run -p 8080:80/tcp image",
        "sort --key=2 file",
        "docker login --password-stdin -u ci",
        "tool --token-file /run/secrets/token",
        "env PWD=/home/user/build make",
        "echo password",
        "curl https://example.com/a:b@c",
        "kubectl --token \"$KUBE_TOKEN\" get pods",
        "sh -c 'deploy --password ${DEPLOY_PASSWORD}'",
        "tokenizer=bert-base run",
        "",
        "--token",
    ] {
        same(s);
    }
}

#[test]
fn token_formats() {
    let aws = "AKIAIOSFODNN7EXAMPLE";
    for (line, secret) in [
        (format!("aws --key {aws} s3 ls"), aws.to_string()),
        ("x ASIAY34FZKBOKMUTVV7A".to_string(), "ASIAY34FZKBOKMUTVV7A".into()),
        (format!("git push https://{GHP}@github.com/o/r"), GHP.into()),
        (
            "gh --with github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz".into(),
            "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz".into(),
        ),
        ("x glpat-xxxxxxxxxxxxxxxxxxxx1".into(), "glpat-xxxxxxxxxxxxxxxxxxxx1".into()),
        ("slack xoxb-1234567890-abcdefghij".into(), "xoxb-1234567890-abcdefghij".into()),
        (
            "maps AIzaSyA-1234567890abcdefghijklmnopqrstu".into(),
            "AIzaSyA-1234567890abcdefghijklmnopqrstu".into(),
        ),
        (
            "npm_abcdefghijABCDEFGHIJ0123456789abcdef publish".into(),
            "npm_abcdefghijABCDEFGHIJ0123456789abcdef".into(),
        ),
    ] {
        let out = red(&line);
        gone(&out, &secret);
    }
    let out = red(&format!("curl {GHP}x"));
    assert_eq!(out, format!("curl {}", fp(&format!("{GHP}x"))));
}

#[test]
fn jwt_whole_token() {
    let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
    let out = red(&format!("curl -d token={jwt}"));
    gone(&out, "eyJzdWIi");
    gone(&out, "dozjgNry");
    same("echo eyJhbGciOiJIUzI1NiJ9");
}

#[test]
fn pem_block_body() {
    let key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\nAAAAAAABAAAAMwAAAAtzc2gtZW\n-----END OPENSSH PRIVATE KEY-----";
    let out = argv(&["ssh-add", key, "next"]);
    assert!(out[1].starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"), "{out:?}");
    assert!(out[1].ends_with("-----END OPENSSH PRIVATE KEY-----"), "{out:?}");
    gone(&out[1], "b3BlbnNzaC1");
    assert_eq!(out[2], "next");
    // Cut off before END: redacted to the end of the argument, nothing beyond.
    let out = argv(&["x", "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7", "y"]);
    gone(&out[1], "MIIEow");
    assert_eq!(out[2], "y");
    same("-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----");
}

#[test]
fn flags_in_every_form() {
    assert_eq!(red("tool --token=s3cr3tValue"), format!("tool --token={}", fp("s3cr3tValue")));
    assert_eq!(argv(&["tool", "--password", "hunter2"]), ["tool", "--password", &fp("hunter2")]);
    assert_eq!(red("tool --password hunter2 x"), format!("tool --password {} x", fp("hunter2")));
    assert_eq!(argv(&["mysql", "-pHunter2!x", "db"])[1], format!("-p{}", fp("Hunter2!x")));
    assert_eq!(argv(&["mysql", "-p", "Xk9#mQ2$vL", "db"])[2], fp("Xk9#mQ2$vL"));
    assert_eq!(argv(&["x", "--api-key", "abc"])[2], fp("abc"));
    assert_eq!(argv(&["keytool", "-storepass", "changeit"])[2], fp("changeit"));
    assert_eq!(
        argv(&["x", "--client-secret=abc def"])[1],
        format!("--client-secret={}", fp("abc def"))
    );
    assert_eq!(argv(&["curl", "-u", "alice:s3cret", "h"])[2], format!("alice:{}", fp("s3cret")));
    assert_eq!(argv(&["curl", "--user=alice:s3cret"])[1], format!("--user=alice:{}", fp("s3cret")));
    // Quoted values in a script: the whole shell word, quotes included, goes.
    assert_eq!(
        red("sh -c 'tool --password \"a b c\" next'"),
        format!("sh -c 'tool --password {} next'", fp("a b c"))
    );
    // One argument (no shell syntax): the value is the rest of the argument.
    assert_eq!(argv(&["x", "--password=a b"])[1], format!("--password={}", fp("a b")));
    // After -c, a script: the value is one shell word.
    assert_eq!(
        argv(&["sh", "-c", "PASSWORD=abc123 make all"])[2],
        format!("PASSWORD={} make all", fp("abc123"))
    );
    // A newline separates like a space.
    gone(&red("x --token\nVALUE_1234 y"), "VALUE_1234");
}

#[test]
fn keyed_values() {
    assert_eq!(
        argv(&["env", "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws"])[1],
        format!("AWS_SECRET_ACCESS_KEY={}", fp("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"))
    );
    gone(&red("aws configure set aws_secret_access_key=abcdEFGH1234"), "abcdEFGH1234");
    gone(&red("GITHUB_TOKEN=abc123xyz ./deploy"), "abc123xyz");
    assert_eq!(
        red("curl https://h/api?token=abc123&page=2"),
        format!("curl https://h/api?token={}&page=2", fp("abc123"))
    );
    assert_eq!(
        red(r#"curl -d '{"client_secret": "x y z", "id": 1}'"#),
        format!(r#"curl -d '{{"client_secret": {}, "id": 1}}'"#, fp("x y z"))
    );
    gone(&red("mount -o user=bob,password=pa55w0rd //srv/share"), "pa55w0rd");
    gone(&red("echo 'password: hunter22'"), "hunter22");
}

#[test]
fn headers_keep_the_scheme() {
    assert_eq!(
        argv(&["curl", "-H", "Authorization: Bearer abc.def.ghi", "https://x"])[2],
        format!("Authorization: Bearer {}", fp("abc.def.ghi"))
    );
    assert_eq!(
        red("sh -c 'curl -H \"proxy-authorization: Basic dXNlcjpwYXNz\" https://x'"),
        format!("sh -c 'curl -H \"proxy-authorization: Basic {}\" https://x'", fp("dXNlcjpwYXNz"))
    );
    gone(&red("curl -H 'Authorization:tok123456'"), "tok123456");
    gone(&red("curl -H 'Cookie: session=abcdef123'"), "abcdef123");
    gone(&red("curl -H 'X-Api-Key: k3yk3yk3y'"), "k3yk3yk3y");
    gone(&red("curl -H 'PRIVATE-TOKEN: zzzz9999'"), "zzzz9999");
}

#[test]
fn url_userinfo() {
    assert_eq!(
        red("git clone https://user:p%40ss@host/repo"),
        format!("git clone https://user:{}@host/repo", fp("p%40ss"))
    );
    gone(
        &red("pip install --index-url https://__token__:pypi1234xyz@pypi.org/simple x"),
        "pypi1234xyz",
    );
    gone(&red("git clone https://Zx81kQ2mP0aL9sV3@gitlab.example/r"), "Zx81kQ2mP0aL9sV3");
    same("git clone https://git@github.com/o/r");
    same("psql postgres://app@db:5432/x");
}

#[test]
fn split_by_quotes_and_backslashes() {
    let (a, b) = GHP.split_at(10);
    for script in [
        format!("echo \"{a}\"'{b}'"),
        format!("echo {a}\"\"{b}"),
        format!("echo {a}\\\n{b}"),
        format!("echo '{a}''{b}' more"),
    ] {
        let out = red(&script);
        assert!(!out.contains(b), "{out:?}");
        assert!(out.contains(&fp(GHP)), "{out:?} lacks the fingerprint of the joined token");
        assert!(out.starts_with("echo "), "{out:?}");
    }
}

#[test]
fn unicode_around_and_inside_values() {
    let out = red(&format!("écho «{GHP}» ✓ --password=pässwörd€ 日本"));
    gone(&out, GHP);
    assert!(!out.contains("pässwörd"), "{out}");
    assert!(out.starts_with("écho «") && out.ends_with(" 日本"), "{out}");
    same("naïve --verbose ✓ 🦀 ünïcödé");
}

#[test]
fn literals_anywhere() {
    let secret = "correct horse battery staple";
    let rd = r().with_literals(vec![secret.into(), b"short".to_vec(), b"exactly8".to_vec()]);
    assert_eq!(rd.literal_count(), 2);
    let a =
        |v: &[&str]| rd.redact_argv(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>(), false);
    // Quoted: one argument.
    let out = a(&["tool", secret, "--flag"]);
    assert_eq!(out, ["tool", &rd.marker(secret.as_bytes()), "--flag"]);
    // Unquoted $(cat secret): split into words, joined again into one marker.
    let out = a(&["tool", "correct", "horse", "battery", "staple", "--flag"]);
    assert_eq!(out, ["tool", &rd.marker(secret.as_bytes()), "--flag"]);
    // Inside a script, split by quotes.
    let out = rd.redact("sh -c 'tool \"correct hor\"\"se battery staple\" x'").into_owned();
    assert!(!out.contains("battery"), "{out}");
    assert!(out.contains(&rd.marker(secret.as_bytes())), "{out}");
    // Short literals are not matched; 8 bytes are.
    assert_eq!(rd.redact("short exactly8 x"), format!("short {} x", rd.marker(b"exactly8")));
}

#[test]
fn truncated_literal_at_the_end() {
    let secret = "Z9x8C7v6B5n4M3a2S1d0";
    let rd = r().with_literals(vec![secret.into()]);
    let v: Vec<String> = vec!["tool".into(), format!("--x={}", &secret[..9])];
    let out = rd.redact_argv(&v, true);
    assert!(!out.join(" ").contains(&secret[..9]), "{out:?}");
    // Not truncated: a prefix is just text.
    assert_eq!(rd.redact_argv(&v, false), v);
}

#[test]
fn literals_from_secret_files() {
    let creds = b"[default]\naws_access_key_id = AKIAEXAMPLEKEYID0000\naws_secret_access_key=wJalrXUtnFEMIK7MDENG\n# comment line here\n";
    let l = literals_from_secret(creds);
    for want in [&b"AKIAEXAMPLEKEYID0000"[..], b"wJalrXUtnFEMIK7MDENG"] {
        assert!(l.iter().any(|x| x == want), "{:?}", l);
    }
    assert!(!l.iter().any(|x| x == b"[default]" || x.starts_with(b"# ")));
    let json = br#"{"type": "service_account", "private_key_id": "0123456789abcdef"}"#;
    assert!(literals_from_secret(json).iter().any(|x| x == b"0123456789abcdef"));
    let rd = r().with_literals(literals_from_secret(b"  tok-Abc123-xyz\n\n"));
    gone(&rd.redact("deploy tok-Abc123-xyz now"), "tok-Abc123-xyz");
}

#[test]
fn long_input_is_bounded() {
    let big = "a ".repeat(MAX_INPUT);
    let out = r().redact_argv(&[big.clone(), "tail".into()], false);
    assert!(out.last().unwrap() == "...");
    assert!(out.iter().map(|a| a.len()).sum::<usize>() <= MAX_INPUT + 8);
    assert!(r().redact(&big).len() <= MAX_INPUT);
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_inputs_never_panic_and_never_show_a_literal() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    const ALPHA: &[&str] = &[
        "a",
        "Z",
        "0",
        "=",
        ":",
        "-",
        "--",
        "\"",
        "'",
        "\\",
        " ",
        "\n",
        "\0",
        "/",
        "@",
        "?",
        "&",
        "é",
        "日",
        "🦀",
        "ghp_",
        "eyJ",
        "AKIA",
        "-----BEGIN ",
        "PRIVATE KEY-----",
        "password",
        "token=",
        "://",
        "Authorization: ",
        "-p",
        "$",
        "{",
        "}",
        ",",
    ];
    let literals: Vec<String> = (0..20)
        .map(|i| {
            let n = 8 + rng.below(30);
            (0..n).map(|_| ALPHA[rng.below(ALPHA.len())]).collect::<String>() + &format!("{i}")
        })
        .filter(|l| {
            let (s, _) = skeleton(l.as_bytes());
            trim_spaces(&s).len() >= MIN_LITERAL_LEN
        })
        .collect();
    let rd = r().with_literals(literals.iter().map(|l| l.as_bytes().to_vec()).collect());
    for round in 0..4000 {
        let mut s = String::new();
        let n = rng.below(200);
        for _ in 0..n {
            if rng.below(40) == 0 {
                // A literal, sometimes with quotes sprinkled in (as a script would).
                let l = &literals[rng.below(literals.len())];
                for c in l.chars() {
                    s.push(c);
                    if rng.below(8) == 0 {
                        s.push(['"', '\''][rng.below(2)]);
                    }
                }
            } else {
                s.push_str(ALPHA[rng.below(ALPHA.len())]);
            }
        }
        // Random bytes too, made valid as the kernel's argv is made valid.
        let raw: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
        s.push_str(&String::from_utf8_lossy(&raw));
        let args: Vec<String> = s.split('\0').map(str::to_string).collect();
        let out = rd.redact_argv(&args, round % 3 == 0);
        let joined = out.join(" ");
        let skel_out = skeleton(joined.as_bytes()).0;
        for l in &literals {
            let (ls, _) = skeleton(l.as_bytes());
            let ls = trim_spaces(&ls);
            assert!(
                find(&skel_out, ls).is_none(),
                "literal {l:?} survives in {joined:?} (from {s:?})"
            );
        }
        let one = rd.redact(&s);
        assert!(one.len() <= s.len() * 20 + 64);
    }
}

#[test]
fn cost_per_command_line() {
    // A realistic 2 KiB argv with no secret (the common case), one with several, and
    // the worst case for the literal filter; printed for the report, bounded loosely.
    let lits: Vec<Vec<u8>> =
        (0..1000).map(|i| format!("literal-secret-{i:06}-xyz").into_bytes()).collect();
    let rd = r().with_literals(lits);
    let plain: Vec<String> = (0..150).map(|i| format!("--opt{i}=v{i}")).collect();
    let mut secrets = plain.clone();
    secrets[10] = GHP.into();
    secrets[50] = "--password=hunter2".into();
    secrets[90] = "literal-secret-000500-xyz".into();
    let worst: Vec<String> = vec!["literal-".repeat(256)];
    for (name, v) in [("plain", &plain), ("secrets", &secrets), ("prefix-flood", &worst)] {
        let len: usize = v.iter().map(|a| a.len() + 1).sum();
        let n = 2000;
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(rd.redact_argv(std::hint::black_box(v), false));
        }
        let per = t.elapsed() / n;
        eprintln!("redact_argv {name}: {len} bytes, {per:?} per command line");
        assert!(per < std::time::Duration::from_millis(2), "{name}: {per:?}");
    }
}
