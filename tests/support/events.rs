//! Predicates and accessors for the daemon's events (`enforcer::event::Event`).
use enforcer::event::{DestinationRef, Event, FileRef, GrantRef, SCHEMA};

/// Events of `kind` from process `pid`.
pub fn by(kind: &'static str, pid: u32) -> impl Fn(&Event) -> bool {
    move |e| e.kind == kind && e.process.pid == pid
}

/// Fields every event must carry (docs/contracts.md, "Events"). Deserializing into `Event`
/// already requires each of them; here they must also say something.
pub fn assert_required_fields(e: &Event) {
    assert_eq!(e.schema, SCHEMA, "{e:?}");
    for (f, v) in [
        ("time", &e.time),
        ("host", &e.host),
        ("kind", &e.kind),
        ("verdict", &e.verdict),
        ("action", &e.action),
        ("mode", &e.mode),
    ] {
        assert!(!v.is_empty(), "event has an empty {f}: {e:?}");
    }
}

/// JSON lines (as stored or printed by `enforcer events`) as events; every line must parse.
pub fn parse_events(text: &str) -> Vec<Event> {
    // A line still being appended (no newline yet) is not an event yet.
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    complete
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not an event ({e}): {l}")))
        .collect()
}

/// The optional parts of an event, for assertions that require them.
pub trait EventExt {
    fn file(&self) -> &FileRef;
    fn dest(&self) -> &DestinationRef;
    fn grant(&self) -> &GrantRef;
    /// The destination port, if the event has a destination.
    fn port(&self) -> Option<u16>;
    /// Whether any decision_path step satisfies `f`.
    fn path_has(&self, f: impl Fn(&str) -> bool) -> bool;
}

impl EventExt for Event {
    fn file(&self) -> &FileRef {
        self.file.as_ref().unwrap_or_else(|| panic!("event has no file: {self:?}"))
    }
    fn dest(&self) -> &DestinationRef {
        self.destination.as_ref().unwrap_or_else(|| panic!("event has no destination: {self:?}"))
    }
    fn grant(&self) -> &GrantRef {
        self.grant.as_ref().unwrap_or_else(|| panic!("event has no grant: {self:?}"))
    }
    fn port(&self) -> Option<u16> {
        self.destination.as_ref().map(|d| d.port)
    }
    fn path_has(&self, f: impl Fn(&str) -> bool) -> bool {
        self.decision_path.iter().any(|p| f(p))
    }
}
