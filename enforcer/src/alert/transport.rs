//! Sink construction: a transport per `[[sink]]` type, built from the typed config, and what
//! the delivery loop needs to know about each (batch size, acknowledgement grace).
use std::time::Duration;

use anyhow::Result;

use super::{Item, file, hec, stdout, syslog, webhook};
use crate::policy::{SinkConfig, SinkKind};

pub(super) enum Transport {
    File(file::FileSink),
    Stdout,
    Syslog(syslog::SyslogSink),
    Webhook(webhook::WebhookSink),
    Hec(hec::HecSink),
}

impl Transport {
    pub(super) fn new(s: &SinkConfig) -> Result<Transport> {
        let name = s.name.as_str();
        Ok(match &s.kind {
            SinkKind::File(f) => Transport::File(file::FileSink::new(f)),
            SinkKind::Stdout => Transport::Stdout,
            SinkKind::Syslog(c) => Transport::Syslog(syslog::SyslogSink::new(name, c)?),
            SinkKind::Webhook(c) => Transport::Webhook(webhook::WebhookSink::new(name, c)?),
            SinkKind::SplunkHec(c) => Transport::Hec(hec::HecSink::new(name, c)?),
        })
    }

    pub(super) async fn send(&mut self, batch: &[Item]) -> Result<()> {
        match self {
            Transport::File(f) => f.send(batch),
            Transport::Stdout => stdout::send(batch),
            Transport::Syslog(s) => s.send(batch).await,
            Transport::Webhook(w) => w.send(batch).await,
            Transport::Hec(h) => h.send(batch).await,
        }
    }

    /// How long a sent batch must go without a connection failure before it counts as
    /// delivered: zero for transports with a real acknowledgement.
    pub(super) fn grace(&self) -> Duration {
        match self {
            Transport::Syslog(_) => syslog::GRACE,
            _ => Duration::ZERO,
        }
    }

    pub(super) async fn alive(&mut self) -> bool {
        match self {
            Transport::Syslog(s) => s.alive().await,
            _ => true,
        }
    }

    pub(super) fn reset(&mut self) {
        match self {
            Transport::File(f) => f.reset(),
            Transport::Syslog(s) => s.reset(),
            _ => {}
        }
    }

    pub(super) fn max_batch(&self) -> usize {
        match self {
            Transport::File(_) | Transport::Stdout => 1024,
            Transport::Syslog(_) => 1000,
            Transport::Webhook(_) | Transport::Hec(_) => 500,
        }
    }
}
