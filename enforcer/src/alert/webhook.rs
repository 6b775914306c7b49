//! HTTPS webhook sink: each batch POSTed as one JSON array; acknowledged by a 2xx answer.
use anyhow::Result;

use super::Item;
use super::http::Client;
use crate::policy::HttpsSinkConfig;

pub struct WebhookSink {
    client: Client,
}

impl WebhookSink {
    pub fn new(name: &str, s: &HttpsSinkConfig) -> Result<WebhookSink> {
        Ok(WebhookSink { client: Client::new(name, s, vec![])? })
    }

    pub async fn send(&mut self, batch: &[Item]) -> Result<()> {
        let mut body =
            Vec::with_capacity(batch.iter().map(|i| i.payload.len() + 1).sum::<usize>() + 2);
        body.push(b'[');
        for (i, item) in batch.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(item.payload.as_bytes());
        }
        body.push(b']');
        self.client.post("application/json", body).await
    }
}
