//! stdout sink: one JSON object per line, for systemd hosts where the journal captures stdout.
use std::io::Write;

use anyhow::Result;

use super::Item;

pub fn send(batch: &[Item]) -> Result<()> {
    let mut buf = Vec::with_capacity(batch.iter().map(|i| i.payload.len() + 1).sum());
    for item in batch {
        buf.extend_from_slice(item.payload.as_bytes());
        buf.push(b'\n');
    }
    let mut out = std::io::stdout().lock();
    out.write_all(&buf)?;
    out.flush()?;
    Ok(())
}
