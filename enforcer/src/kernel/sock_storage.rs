//! The egress hook's per-socket state, `SOCK_STORAGE` (enforcer-ebpf/src/egress.rs): a
//! socket-local storage map (BPF_MAP_TYPE_SK_STORAGE). The state lives in the socket, so no
//! flood of other sockets can evict it, and it is freed with the socket.
//!
//! The kernel creates socket-local storage maps only with BTF naming their key (an `int`)
//! and value types (sock_diag can dump them), and the eBPF object carries no BTF (bpf-linker
//! runs without `--btf`), so aya cannot create this map from the object's definition. The
//! daemon creates it here, described by a few bytes of BTF, and pins it under the name the
//! object gives it; aya's loader then reuses the pin like every other pinned map, and a
//! restarted daemon adopts it (blocked and tainted sockets stay so across a restart).
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result, bail};
use aya::maps::{MapData, MapInfo, MapType};
use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_map_type};
use enforcer_common::SockState;

/// The map's name in the eBPF object and under the pin dir.
pub const NAME: &str = "SOCK_STORAGE";

/// The map the egress hook kept before socket-local storage (an LRU hash keyed by socket
/// cookie, evictable): removed from the pin dir once the new programs run.
pub const OLD_NAME: &str = "SOCK_STATE";

/// `BPF_F_NO_PREALLOC`: socket-local storage maps must be created with it.
const NO_PREALLOC: u32 = 1;

/// `SockState`'s fields as BTF describes them: (name, size in bytes), in order, no padding.
const FIELDS: [(&str, u32); 4] = [("owner", 4), ("flags", 4), ("owner_start_ns", 8), ("taint", 8)];

/// Opens `<pin_dir>/SOCK_STORAGE` when it is this map (type and value size), else creates
/// and pins it. A pin of another layout (another version's) is replaced: programs still
/// attached keep their own reference to it.
pub fn ensure_pinned(pin_dir: &Path) -> Result<()> {
    let path = pin_dir.join(NAME);
    if path.exists() {
        let fits = MapInfo::from_pin(&path).is_ok_and(|i| {
            matches!(i.map_type(), Ok(MapType::SkStorage))
                && i.value_size() as usize == size_of::<SockState>()
        });
        if fits {
            return Ok(());
        }
        std::fs::remove_file(&path)
            .with_context(|| format!("remove {} (another layout)", path.display()))?;
    }
    let btf = bpf_btf_load(&btf_blob()).context("load the BTF of the socket storage map")?;
    let map = bpf_map_create(&btf).with_context(|| {
        format!("create the socket storage map {NAME} (BPF_MAP_TYPE_SK_STORAGE)")
    })?;
    let data = MapData::from_fd(map).with_context(|| format!("open map {NAME}"))?;
    match data.pin(&path) {
        Ok(()) => Ok(()),
        // Another loader pinned it meanwhile (the doctor's probe uses its own dir): use theirs.
        Err(_) if path.exists() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("pin map {NAME} at {}", path.display())),
    }
}

/// BTF kinds and encodings used below (include/uapi/linux/btf.h).
const BTF_MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_STRUCT: u32 = 4;
const INT_SIGNED: u32 = 1;

/// Type ids of `btf_blob`: [1] int (the key), [2] u32, [3] u64, [4] struct sock_state.
const KEY_TYPE: u32 = 1;
const VALUE_TYPE: u32 = 4;

/// BTF for the map: `int` key, `struct sock_state` value (`SockState`'s layout).
fn btf_blob() -> Vec<u8> {
    let mut strings = vec![0u8];
    let mut name = |s: &str| {
        let off = strings.len() as u32;
        strings.extend_from_slice(s.as_bytes());
        strings.push(0);
        off
    };
    let (int, u32_, u64_, state) =
        (name("int"), name("unsigned int"), name("long long unsigned int"), name("sock_state"));
    let members: Vec<(u32, u32)> = FIELDS.iter().map(|(n, size)| (name(n), *size)).collect();
    let mut types: Vec<u32> = vec![
        int,
        KIND_INT << 24,
        4,
        INT_SIGNED << 24 | 32,
        u32_,
        KIND_INT << 24,
        4,
        32,
        u64_,
        KIND_INT << 24,
        8,
        64,
        state,
        KIND_STRUCT << 24 | FIELDS.len() as u32,
        size_of::<SockState>() as u32,
    ];
    let mut bit_offset = 0;
    for (name, size) in members {
        types.extend([name, if size == 4 { 2 } else { 3 }, bit_offset]);
        bit_offset += size * 8;
    }
    let types: Vec<u8> = types.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let mut out = Vec::new();
    out.extend(BTF_MAGIC.to_ne_bytes());
    out.extend([1u8, 0]); // version, flags
    for v in [24u32, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
        out.extend(v.to_ne_bytes()); // hdr_len, type_off, type_len, str_off, str_len
    }
    out.extend(types);
    out.extend(strings);
    out
}

fn bpf_btf_load(blob: &[u8]) -> Result<OwnedFd> {
    let mut log = vec![0u8; 64 * 1024];
    // SAFETY: bpf_attr is plain old data; all zero is its "unset" value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the BTF-load member of the zeroed union.
    let b = unsafe { &mut attr.__bindgen_anon_7 };
    b.btf = blob.as_ptr() as u64;
    b.btf_size = blob.len() as u32;
    b.btf_log_buf = log.as_mut_ptr() as u64;
    b.btf_log_size = log.len() as u32;
    b.btf_log_level = 1;
    match super::ipc::bpf(bpf_cmd::BPF_BTF_LOAD, &mut attr) {
        Ok(fd) => Ok(fd),
        Err(e) => {
            let said = String::from_utf8_lossy(&log);
            bail!("{e}: {}", said.trim_end_matches('\0').trim())
        }
    }
}

fn bpf_map_create(btf: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: as in bpf_btf_load.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the map-create member of the zeroed union.
    let m = unsafe { &mut attr.__bindgen_anon_1 };
    m.map_type = bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as u32;
    m.key_size = 4;
    m.value_size = size_of::<SockState>() as u32;
    m.max_entries = 0;
    m.map_flags = NO_PREALLOC;
    for (d, s) in m.map_name.iter_mut().zip(NAME.bytes().take(15)) {
        *d = s as libc::c_char;
    }
    m.btf_fd = btf.as_raw_fd() as u32;
    m.btf_key_type_id = KEY_TYPE;
    m.btf_value_type_id = VALUE_TYPE;
    super::ipc::bpf(bpf_cmd::BPF_MAP_CREATE, &mut attr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn btf_describes_sock_state() {
        assert_eq!(FIELDS.iter().map(|(_, s)| s).sum::<u32>() as usize, size_of::<SockState>());
        let b = btf_blob();
        assert_eq!(u16::from_ne_bytes([b[0], b[1]]), BTF_MAGIC);
        let word = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().unwrap());
        let (type_len, str_len) = (word(16) as usize, word(20) as usize);
        assert_eq!(b.len(), 24 + type_len + str_len);
        // 3 ints (4 words each), the struct (3 words) and its members (3 words each).
        assert_eq!(type_len, 4 * (3 * 4 + 3 + 3 * FIELDS.len()));
    }
}
