//! The credential source the census proposes in place of a static credential: brokered
//! STS credentials (`[intent.aws]`, with a session policy built from the AWS services the
//! job actually reached) for AWS keys, and a daemon-held secret (`value_file`, delivered with
//! `enforcer secret get` / `enforcer run --env`) for everything else. Every string that came
//! from an event is escaped for where it goes (`toml_str` in TOML, serde in JSON).
use std::collections::BTreeSet;

use serde::Serialize;
use serde_json::{Value, json};

use super::census::{DestinationUse, file_safe, slug, toml_str};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CredentialSource {
    /// `aws_role` (brokered STS credentials) or `daemon_held_secret`.
    pub kind: String,
    /// TOML to add: an `[intent.aws]` table for the proposed intent, or the `[[secret]]`
    /// holding the value in a root-only file.
    pub toml: String,
    /// `aws_role`: the IAM session policy to write to the file `toml` names (None when no
    /// AWS service name was observed: only addresses, so no policy can be derived).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_policy: Option<Value>,
    /// How the job gets the credential then.
    pub usage: String,
}

/// Whether a credential is an AWS key: the shared credentials/config file, or an AWS_*
/// key in the environment.
pub fn is_aws(name: &str, dests: &[DestinationUse]) -> bool {
    let n = name.to_ascii_lowercase();
    n.starts_with("env:aws_")
        || n.contains("aws")
        || dests.iter().any(|d| d.names.iter().any(|h| h.ends_with(".amazonaws.com")))
}

pub fn propose(
    name: &str,
    kind: &str,
    secret_name: &str,
    intent_name: &str,
    dests: &[DestinationUse],
) -> CredentialSource {
    if is_aws(name, dests) {
        aws_role(intent_name, dests)
    } else {
        held_secret(name, kind, secret_name, intent_name)
    }
}

fn aws_role(intent_name: &str, dests: &[DestinationUse]) -> CredentialSource {
    let names: BTreeSet<&str> =
        dests.iter().flat_map(|d| d.names.iter().map(String::as_str)).collect();
    let services: Vec<AwsService> = names.iter().filter_map(|n| AwsService::of(n)).collect();
    let region =
        services.iter().find_map(|s| s.region.clone()).unwrap_or_else(|| "us-east-1".into());
    let policy_file = format!("/etc/enforcer/policies/{}.json", slug(intent_name));
    let session_policy = session_policy(&services);
    let (note, policy_line) = match &session_policy {
        Some(_) => (
            "# write `session_policy` (below) to that file: it allows only the AWS services the job reached.".to_string(),
            format!("session_policy = {}\n", toml_str(&policy_file)),
        ),
        None => (
            format!(
                "# the job's destinations were seen by address only, so no session policy could be\n\
                 # derived: write one by hand and add `session_policy = {}`.",
                toml_str(&policy_file)
            ),
            String::new(),
        ),
    };
    let toml = format!(
        "# Replaces the static AWS key: STS credentials minted per grant of this intent, alive\n\
         # only while the grant lives. Append under the proposed [[intent]]; set the role.\n\
         {note}\n\
         [intent.aws]\nrole_arn = {}\nregion = {}\n{policy_line}",
        toml_str(&format!("arn:aws:iam::000000000000:role/{}", slug(intent_name))),
        toml_str(&region),
    );
    CredentialSource {
        kind: "aws_role".into(),
        toml,
        session_policy,
        usage: format!(
            "enforcer run --intent {} -- CMD (the SDK reads AWS_CONTAINER_CREDENTIALS_FULL_URI), or an AWS profile with credential_process = enforcer credential aws --intent {}; remove the static key",
            slug(intent_name),
            slug(intent_name)
        ),
    }
}

fn held_secret(name: &str, kind: &str, secret_name: &str, intent_name: &str) -> CredentialSource {
    let (var, file) = match name.strip_prefix("env:") {
        Some(var) => (Some(var), file_safe(var)),
        None => (None, file_safe(secret_name)),
    };
    let toml = format!(
        "# Replaces the {} credential's copy where the job can read it: the value lives in a\n\
         # root-only file (0600) only the daemon reads, and is handed to granted processes.\n\
         # (For a file secret this [[secret]] replaces the one with `paths`.)\n\
         [[secret]]\nname = {}\nvalue_file = {}\nkind = \"token\"\n",
        if kind == "env" { "environment" } else { "file" },
        toml_str(secret_name),
        toml_str(&format!("/etc/enforcer/secrets/{file}")),
    );
    let usage = match var {
        // A variable name from the event: shown as written, inside the usage text only.
        Some(var) => format!(
            "enforcer run --intent {} --env {}=secret:{} -- CMD",
            slug(intent_name),
            shell_word(var),
            secret_name
        ),
        None => format!(
            "within enforcer run --intent {}: enforcer secret get {}",
            slug(intent_name),
            secret_name
        ),
    };
    CredentialSource { kind: "daemon_held_secret".into(), toml, session_policy: None, usage }
}

/// A variable name is used verbatim only when it is a plain shell word.
fn shell_word(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        s.to_string()
    } else {
        "VAR".to_string()
    }
}

/// An AWS endpoint name: `<service>.<region>.amazonaws.com`, `<bucket>.s3[.<region>].amazonaws.com`.
#[derive(Debug, PartialEq)]
struct AwsService {
    service: String,
    region: Option<String>,
    bucket: Option<String>,
}

impl AwsService {
    fn of(host: &str) -> Option<AwsService> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let stem = host.strip_suffix(".amazonaws.com")?;
        let labels: Vec<&str> = stem.split('.').collect();
        let is_region = |l: &str| l.contains('-') && l.chars().any(|c| c.is_ascii_digit());
        let region = labels.iter().find(|l| is_region(l)).map(|l| l.to_string());
        let rest: Vec<&str> = labels
            .iter()
            .copied()
            .filter(|l| !is_region(l) && !matches!(*l, "fips" | "dualstack" | ""))
            .collect();
        let (service, before) = rest.split_last()?;
        let valid =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !valid(service) {
            return None;
        }
        let bucket = (*service == "s3" && !before.is_empty()).then(|| before.join("."));
        let bucket_ok =
            |b: &str| b.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if bucket.as_deref().is_some_and(|b| !bucket_ok(b)) {
            return None;
        }
        Some(AwsService { service: service.to_string(), region, bucket })
    }
}

/// One statement per service: its actions (`<service>:*`), narrowed to the buckets seen for S3.
fn session_policy(services: &[AwsService]) -> Option<Value> {
    let mut statements = Vec::new();
    let mut done = BTreeSet::new();
    for s in services {
        if s.service == "sts" || !done.insert(s.service.clone()) {
            continue;
        }
        let buckets: BTreeSet<&str> = services
            .iter()
            .filter(|o| o.service == s.service)
            .filter_map(|o| o.bucket.as_deref())
            .collect();
        let resource: Value = if s.service == "s3" && !buckets.is_empty() {
            json!(
                buckets
                    .iter()
                    .flat_map(|b| [format!("arn:aws:s3:::{b}"), format!("arn:aws:s3:::{b}/*")])
                    .collect::<Vec<_>>()
            )
        } else {
            json!("*")
        };
        statements.push(json!({"Effect": "Allow", "Action": [format!("{}:*", s.service)], "Resource": resource}));
    }
    (!statements.is_empty()).then(|| json!({"Version": "2012-10-17", "Statement": statements}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_from_endpoint_names() {
        let s = AwsService::of("my-bucket.s3.eu-west-1.amazonaws.com").unwrap();
        assert_eq!(
            (s.service.as_str(), s.region.as_deref(), s.bucket.as_deref()),
            ("s3", Some("eu-west-1"), Some("my-bucket"))
        );
        assert_eq!(AwsService::of("dynamodb.us-east-1.amazonaws.com").unwrap().service, "dynamodb");
        assert_eq!(AwsService::of("s3.amazonaws.com").unwrap().bucket, None);
        assert!(AwsService::of("example.com").is_none());
        assert!(AwsService::of("a\"b.amazonaws.com").is_none());
        let p = session_policy(&[
            AwsService::of("b1.s3.us-east-1.amazonaws.com").unwrap(),
            AwsService::of("sts.us-east-1.amazonaws.com").unwrap(),
            AwsService::of("sqs.us-east-1.amazonaws.com").unwrap(),
        ])
        .unwrap();
        assert_eq!(p["Statement"][0]["Action"][0], "s3:*");
        assert_eq!(p["Statement"][0]["Resource"][1], "arn:aws:s3:::b1/*");
        assert_eq!(p["Statement"][1]["Action"][0], "sqs:*");
        assert_eq!(
            p["Statement"].as_array().unwrap().len(),
            2,
            "sts is the broker's, not the job's"
        );
    }
}
