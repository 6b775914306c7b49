//! AWS Signature Version 4 for the one request the broker makes (an STS Query API POST):
//! canonical request, string to sign, derived key, `Authorization` header. Checked against
//! a signature botocore computed for the same request (test below).
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Base credentials that sign the request (the daemon's own, never an agent's).
#[derive(Clone)]
pub struct BaseCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for BaseCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "BaseCredentials({})", self.access_key_id)
    }
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data.as_bytes());
    m.finalize().into_bytes().to_vec()
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// RFC 3986 percent-encoding of everything but the unreserved characters (what SigV4 and
/// the Query API's form bodies expect).
pub fn uri_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The headers to add to a `POST /` with a form `body` to `host` (the Host header's value),
/// signed at `amz_date` (`YYYYMMDDTHHMMSSZ`): `X-Amz-Date`, `X-Amz-Security-Token` (when the
/// base credentials are temporary) and `Authorization`.
pub fn sign_post(
    creds: &BaseCredentials,
    region: &str,
    service: &str,
    host: &str,
    content_type: &str,
    body: &[u8],
    amz_date: &str,
) -> Vec<(&'static str, String)> {
    let date = &amz_date[..8];
    let mut headers: Vec<(&str, String)> = vec![
        ("content-type", content_type.to_string()),
        ("host", host.to_string()),
        ("x-amz-date", amz_date.to_string()),
    ];
    if let Some(t) = &creds.session_token {
        headers.push(("x-amz-security-token", t.clone()));
    }
    let canonical_headers: String =
        headers.iter().map(|(k, v)| format!("{k}:{}\n", v.trim())).collect();
    let signed: Vec<&str> = headers.iter().map(|(k, _)| *k).collect();
    let signed = signed.join(";");
    let canonical = format!("POST\n/\n\n{canonical_headers}\n{signed}\n{}", sha256_hex(body));
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let to_sign =
        format!("AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}", sha256_hex(canonical.as_bytes()));
    let k_date = hmac(format!("AWS4{}", creds.secret_access_key).as_bytes(), date);
    let k_region = hmac(&k_date, region);
    let k_service = hmac(&k_region, service);
    let k_signing = hmac(&k_service, "aws4_request");
    let signature = hex::encode(hmac(&k_signing, &to_sign));
    let mut out = vec![("X-Amz-Date", amz_date.to_string())];
    if let Some(t) = &creds.session_token {
        out.push(("X-Amz-Security-Token", t.clone()));
    }
    out.push((
        "Authorization",
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}",
            creds.access_key_id
        ),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// botocore 1.x `SigV4Auth(...).add_auth` over the same request gave this signature.
    #[test]
    fn matches_botocore() {
        let creds = BaseCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: Some("SESSIONTOKEN".into()),
        };
        let body = "Action=AssumeRole&DurationSeconds=900&Policy=%7B%22Statement%22%3A%5B%5D%7D&RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fdeploy&RoleSessionName=g_abc&Version=2011-06-15";
        let h = sign_post(
            &creds,
            "us-east-1",
            "sts",
            "127.0.0.1:5000",
            "application/x-www-form-urlencoded; charset=utf-8",
            body.as_bytes(),
            "20261130T060630Z",
        );
        let auth = &h.iter().find(|(k, _)| *k == "Authorization").unwrap().1;
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261130/us-east-1/sts/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-security-token, Signature=2a01a463ec694c678ab78ccfd380f2e93f1a55fe75c19c73d42ff65fc3b60ca5"
        );
        assert_eq!(format!("{creds:?}"), "BaseCredentials(AKIDEXAMPLE)");
    }

    #[test]
    fn encodes() {
        assert_eq!(
            uri_encode("arn:aws:iam::1:role/a b~"),
            "arn%3Aaws%3Aiam%3A%3A1%3Arole%2Fa%20b~"
        );
    }
}
