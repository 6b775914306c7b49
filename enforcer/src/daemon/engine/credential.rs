//! Events of the credential services (brokered AWS credentials, daemon-held secrets): the
//! API tasks report what they did as `CredentialNotice`s; the engine, which owns the event
//! store, writes them with the process attributed like any other event.
use super::Engine;
use crate::aws::CredentialNotice;
use crate::decide::Decision;

impl Engine {
    pub fn on_credential_notice(&mut self, n: CredentialNotice) {
        let pid = if n.pid != 0 { n.pid } else { std::process::id() };
        // The API attested this process a moment ago: its basics are read now if the
        // lineage records have not brought it yet.
        self.table.get_or_read_basics(pid);
        let mut process = self.process_ref(pid, None).0;
        if process.exe.is_empty()
            && let Some(exe) = n.exe.filter(|_| n.pid != 0)
        {
            // It may have exited (no exe link left) before this event is written.
            process.exe = exe;
        }
        let mut e = self.event(n.kind, &Decision::informational(), process);
        e.verdict = n.verdict.into();
        e.action = n.action.into();
        e.severity = n.severity.into();
        e.grant = n.grant;
        e.secrets = n.secrets;
        e.credentials = n.credentials;
        e.decision_path = n.decision_path;
        e.message = Some(n.message);
        if n.verdict == "no_grant" && !e.secrets.is_empty() {
            e.mitre = vec!["T1552.001".into()];
        }
        self.emit(e);
    }
}
