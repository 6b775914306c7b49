//! Which destinations name a DNS name: exact names and `*.zone` wildcards (any name below
//! the zone, never the zone itself), compared in lower case without the trailing dot.

/// `name` in the form destinations are written in: lower case, no trailing dot.
pub fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Whether the destination name `pattern` (as parsed: lower case, `*.` only as the whole
/// first label) names `name` (normalized).
pub fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(zone) => {
            name.len() > zone.len() + 1
                && name.ends_with(zone)
                && name.as_bytes()[name.len() - zone.len() - 1] == b'.'
        }
        None => pattern == name,
    }
}

/// The union of the port ranges of the destinations in `names` (name, lo, hi) that name any
/// of `chain`.
pub fn ports_for(names: &[(String, u16, u16)], chain: &[String]) -> Vec<(u16, u16)> {
    names
        .iter()
        .filter(|(p, _, _)| chain.iter().any(|n| matches(p, n)))
        .map(|(_, lo, hi)| (*lo, *hi))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_wildcard() {
        assert!(matches("api.example.com", "api.example.com"));
        assert!(!matches("api.example.com", "xapi.example.com"));
        assert!(!matches("api.example.com", "api.example.com.evil"));
        assert!(matches("*.example.com", "a.example.com"));
        assert!(matches("*.example.com", "a.b.example.com"));
        // The zone itself, a look-alike suffix and a bare dot are not below the zone.
        assert!(!matches("*.example.com", "example.com"));
        assert!(!matches("*.example.com", "badexample.com"));
        assert!(!matches("*.example.com", ".example.com"));
        assert_eq!(normalize("API.Example.COM."), "api.example.com");
    }

    #[test]
    fn ports_of_every_name_in_the_chain() {
        let names = vec![
            ("api.example.com".to_string(), 443, 443),
            ("*.cdn.example.net".to_string(), 80, 80),
            ("other.example.org".to_string(), 22, 22),
        ];
        let chain = vec!["api.example.com".to_string(), "edge1.cdn.example.net".to_string()];
        assert_eq!(ports_for(&names, &chain), vec![(443, 443), (80, 80)]);
        assert!(ports_for(&names, &["nothing.example".to_string()]).is_empty());
    }
}
