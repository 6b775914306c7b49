//! Splunk HTTP Event Collector sink (`/services/collector/event`): concatenated
//! `{"time":..,"host":..,"sourcetype":"enforcer","event":{..}}` objects per POST, authenticated
//! with `Authorization: Splunk <token>` (the token never appears in logs or errors).
use anyhow::Result;

use super::Item;
use super::http::Client;
use crate::policy::HecSinkConfig;

pub struct HecSink {
    client: Client,
}

impl HecSink {
    pub fn new(name: &str, s: &HecSinkConfig) -> Result<HecSink> {
        let auth = ("Authorization".into(), format!("Splunk {}", s.token.0));
        Ok(HecSink { client: Client::new(name, &s.https, vec![auth])? })
    }

    pub async fn send(&mut self, batch: &[Item]) -> Result<()> {
        let mut body = Vec::new();
        for item in batch {
            // HEC time: epoch seconds with sub-second precision.
            let time = chrono::DateTime::parse_from_rfc3339(&item.event.time)
                .map(|t| t.timestamp_micros() as f64 / 1e6)
                .unwrap_or(0.0);
            let host = serde_json::to_string(&item.event.host)?;
            body.extend_from_slice(
                format!(
                    "{{\"time\":{time:.6},\"host\":{host},\"sourcetype\":\"enforcer\",\"event\":"
                )
                .as_bytes(),
            );
            body.extend_from_slice(item.payload.as_bytes());
            body.push(b'}');
        }
        self.client.post("application/json", body).await
    }
}
