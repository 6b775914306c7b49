//! Kernel struct offsets from BTF. rustc emits no CO-RE relocations, so offsets the kernel
//! programs need are read here from /sys/kernel/btf/vmlinux and handed in as globals.
//!
//! The reader keeps the raw BTF (about 5 MB) and one `u32` per type (where it starts) and
//! answers each question by walking the types in place: a full parse into per-type objects
//! (btfparse, aya's `Btf`) costs several times the file in heap, and the daemon's start-up
//! high-water mark is what a unit's `MemoryMax` must allow. aya's own `Btf`, which loading
//! BPF-LSM programs needs, is parsed from the same bytes on first use (`aya`) and dropped
//! with this reader.
use std::cell::OnceCell;

use anyhow::{Context, Result, anyhow, bail};

const PATH: &str = "/sys/kernel/btf/vmlinux";
const MAGIC: u16 = 0xeb9f;

/// BTF kinds (include/uapi/linux/btf.h) this reader looks into.
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

pub struct KernelBtf {
    data: Vec<u8>,
    /// The string section in `data`.
    strings: std::ops::Range<usize>,
    /// Where each type starts in `data`; index = type id - 1.
    starts: Vec<u32>,
    aya: OnceCell<aya::Btf>,
}

/// One type's header (`struct btf_type`).
#[derive(Clone, Copy)]
struct Type {
    at: usize,
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// `size` or `type`, by kind.
    size_or_type: u32,
}

impl KernelBtf {
    pub fn load() -> Result<Self> {
        let data =
            std::fs::read(PATH).with_context(|| format!("read {PATH} (kernel BTF is required)"))?;
        Self::parse(data).with_context(|| format!("parse {PATH}"))
    }

    fn parse(data: Vec<u8>) -> Result<Self> {
        let u32_at = |at: usize| -> Result<u32> { read_u32(&data, at) };
        if data.len() < 24 || u16::from_ne_bytes([data[0], data[1]]) != MAGIC {
            bail!("not BTF of this machine's byte order (magic)");
        }
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let types_at = hdr_len.checked_add(type_off).context("type section offset")?;
        let types_end = types_at.checked_add(type_len).context("type section length")?;
        let str_at = hdr_len.checked_add(str_off).context("string section offset")?;
        let str_end = str_at.checked_add(str_len).context("string section length")?;
        if types_end > data.len() || str_end > data.len() {
            bail!("sections reach past the end of the data");
        }
        let mut btf =
            KernelBtf { data, strings: str_at..str_end, starts: Vec::new(), aya: OnceCell::new() };
        let mut at = types_at;
        let mut starts = Vec::with_capacity(type_len / 24);
        while at < types_end {
            let t = btf.header(at)?;
            starts.push(u32::try_from(at).context("BTF larger than 4 GiB")?);
            at = at.checked_add(12 + trailer_len(&t)?).context("type length")?;
        }
        if at != types_end {
            bail!("the last type runs past the type section");
        }
        btf.starts = starts;
        Ok(btf)
    }

    fn header(&self, at: usize) -> Result<Type> {
        let info = read_u32(&self.data, at + 4)?;
        Ok(Type {
            at,
            name_off: read_u32(&self.data, at)?,
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 == 1,
            size_or_type: read_u32(&self.data, at + 8)?,
        })
    }

    fn by_id(&self, id: u32) -> Result<Type> {
        let at = id
            .checked_sub(1)
            .and_then(|i| self.starts.get(i as usize))
            .ok_or_else(|| anyhow!("type id {id} out of range"))?;
        self.header(*at as usize)
    }

    fn name(&self, off: u32) -> &[u8] {
        let s = &self.data[self.strings.clone()];
        let rest = s.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// The struct or union called `name` (the first one, as the kernel's BTF is deduplicated).
    fn composite(&self, name: &str) -> Option<Type> {
        self.starts.iter().find_map(|&at| {
            let t = self.header(at as usize).ok()?;
            let composite = t.kind == KIND_STRUCT || t.kind == KIND_UNION;
            (composite && self.name(t.name_off) == name.as_bytes()).then_some(t)
        })
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Result<Type> {
        for _ in 0..32 {
            let t = self.by_id(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Ok(t),
            }
        }
        bail!("type id {id}: typedef chain too long")
    }

    /// Bit offset of member `name` in the struct or union `t`, looking through anonymous
    /// members, and the member's type id; Err for a bitfield.
    fn member(&self, t: &Type, name: &str, depth: u32) -> Result<Option<(u32, u32)>> {
        if depth > 8 {
            return Ok(None);
        }
        for i in 0..t.vlen {
            let m = t.at + 12 + i * 12;
            let (m_name, m_type, m_off) = (
                read_u32(&self.data, m)?,
                read_u32(&self.data, m + 4)?,
                read_u32(&self.data, m + 8)?,
            );
            // With kind_flag, the top 8 bits are a bitfield's size.
            let (bits, bitfield) = match t.kind_flag {
                true => (m_off & 0xff_ffff, m_off >> 24 != 0),
                false => (m_off, false),
            };
            if m_name == 0 {
                let inner = self.resolve(m_type)?;
                if (inner.kind == KIND_STRUCT || inner.kind == KIND_UNION)
                    && let Some((off, ty)) = self.member(&inner, name, depth + 1)?
                {
                    return Ok(Some((bits + off, ty)));
                }
            } else if self.name(m_name) == name.as_bytes() {
                if bitfield {
                    bail!("a bitfield");
                }
                return Ok(Some((bits, m_type)));
            }
        }
        Ok(None)
    }

    /// Byte offset of `path` (e.g. "mm" or "sk_lock.owned", through anonymous members) in
    /// `struct name`.
    pub fn offset(&self, name: &str, path: &str) -> Result<u32> {
        let mut t =
            self.composite(name).ok_or_else(|| anyhow!("struct {name} not in kernel BTF"))?;
        let mut bits = 0u32;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let (off, ty) = match self.member(&t, part, 0) {
                Ok(Some(found)) => found,
                Ok(None) => bail!("{name}.{path} not in kernel BTF"),
                Err(e) => bail!("{name}.{path} is {e}"),
            };
            bits = bits.checked_add(off).context("offset overflow")?;
            if parts.peek().is_some() {
                t = self.resolve(ty)?;
                if t.kind != KIND_STRUCT && t.kind != KIND_UNION {
                    bail!("{name}.{path}: {part} is not a struct or union");
                }
            }
        }
        if !bits.is_multiple_of(8) {
            bail!("{name}.{path} is not byte-aligned");
        }
        Ok(bits / 8)
    }

    /// aya's view of the same BTF (what loading a BPF-LSM program needs), parsed on first use
    /// and dropped with `self`.
    pub fn aya(&self) -> Result<&aya::Btf> {
        if let Some(b) = self.aya.get() {
            return Ok(b);
        }
        let b = aya::Btf::parse(&self.data, aya::Endianness::default())
            .with_context(|| format!("parse {PATH}"))?;
        Ok(self.aya.get_or_init(|| b))
    }
}

fn read_u32(data: &[u8], at: usize) -> Result<u32> {
    let b = data.get(at..at + 4).ok_or_else(|| anyhow!("read past the end of BTF at {at}"))?;
    Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// Bytes after a type's 12-byte header, by kind.
fn trailer_len(t: &Type) -> Result<usize> {
    Ok(match t.kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * t.vlen,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * t.vlen,
        0 | 2 | 7 | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | 12 | 16
        | KIND_TYPE_TAG => 0,
        k => bail!("unknown BTF kind {k} at byte {}", t.at),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: `types` (each header + trailer as u32 words) and `strings`.
    fn blob(types: &[&[u32]], strings: &[u8]) -> Vec<u8> {
        let words: Vec<u32> = types.iter().flat_map(|t| t.iter().copied()).collect();
        let type_len = words.len() as u32 * 4;
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_ne_bytes());
        b.extend_from_slice(&[1, 0]);
        for w in [24u32, 0, type_len, type_len, strings.len() as u32] {
            b.extend_from_slice(&w.to_ne_bytes());
        }
        for w in words {
            b.extend_from_slice(&w.to_ne_bytes());
        }
        b.extend_from_slice(strings);
        b
    }

    fn info(kind: u32, vlen: u32, kind_flag: bool) -> u32 {
        (kind << 24) | vlen | ((kind_flag as u32) << 31)
    }

    #[test]
    fn offsets_through_anonymous_members_typedefs_and_bitfields() {
        // Strings: 0 "", 1 "int", 5 "outer", 11 "a", 13 "b", 15 "lock_t", 22 "owned",
        // 28 "inner", 34 "flag", 39 "lock".
        let strings = b"\0int\0outer\0a\0b\0lock_t\0owned\0inner\0flag\0lock\0";
        let types: &[&[u32]] = &[
            // [1] int, 4 bytes.
            &[1, info(KIND_INT, 0, false), 4, 32],
            // [2] anonymous union { int a; int b; }.
            &[0, info(KIND_UNION, 2, false), 4, 11, 1, 0, 13, 1, 0],
            // [3] struct inner { int owned; } and [4] typedef inner lock_t.
            &[28, info(KIND_STRUCT, 1, false), 4, 22, 1, 0],
            &[15, info(KIND_TYPEDEF, 0, false), 3],
            // [5] struct outer { union { a; b } (anonymous) at byte 8; lock_t lock at 16;
            //   int flag:3 at bit 160 } (kind_flag: member offsets carry bitfield sizes).
            &[5, info(KIND_STRUCT, 3, true), 24, 0, 2, 64, 39, 4, 128, 34, 1, (3 << 24) | 160],
        ];
        let btf = KernelBtf::parse(blob(types, strings)).unwrap();
        assert_eq!(btf.offset("outer", "a").unwrap(), 8);
        assert_eq!(btf.offset("outer", "b").unwrap(), 8);
        assert_eq!(btf.offset("outer", "lock").unwrap(), 16);
        assert_eq!(btf.offset("outer", "lock.owned").unwrap(), 16);
        assert_eq!(btf.offset("inner", "owned").unwrap(), 0);
        assert!(btf.offset("outer", "flag").unwrap_err().to_string().contains("bitfield"));
        assert!(btf.offset("outer", "c").unwrap_err().to_string().contains("not in kernel BTF"));
        assert!(btf.offset("lock_t", "owned").is_err(), "a typedef is not a struct name");
        assert!(btf.offset("nope", "a").is_err());
    }

    #[test]
    fn truncated_or_foreign_data_is_refused() {
        assert!(KernelBtf::parse(vec![0; 8]).is_err());
        let mut b = blob(&[&[1, info(KIND_INT, 0, false), 4, 32]], b"\0int\0");
        b.truncate(b.len() - 6);
        assert!(KernelBtf::parse(b).is_err());
        let unknown_kind = blob(&[&[0, info(30, 0, false), 0]], b"\0");
        assert!(KernelBtf::parse(unknown_kind).is_err());
    }

    #[test]
    fn finds_offsets_in_the_running_kernel() {
        let Ok(btf) = KernelBtf::load() else {
            eprintln!("SKIP: no readable kernel BTF here");
            return;
        };
        let start = btf.offset("mm_struct", "arg_start").unwrap();
        let end = btf.offset("mm_struct", "arg_end").unwrap();
        assert_eq!(end, start + 8);
        assert!(btf.offset("task_struct", "mm").unwrap() > 0);
        assert!(btf.offset("task_struct", "no_such_member").is_err());
        // Through a typedef'd struct member (socket_lock_t).
        assert!(btf.offset("sock", "sk_lock.owned").unwrap() > 0);
        for (s, m) in [
            ("task_struct", "tgid"),
            ("task_struct", "start_boottime"),
            ("sock", "sk_lock.owned"),
            ("bpf_sock_addr_kern", "uaddrlen"),
            ("file", "f_inode"),
            ("dentry", "d_name"),
        ] {
            eprintln!("{s}.{m} at {}", btf.offset(s, m).unwrap());
        }
        // The same answers as aya's parse of the same bytes: the id of a function an LSM
        // program attaches to is found there.
        let aya = btf.aya().unwrap();
        assert!(aya.id_by_type_name_kind("bpf_lsm_file_open", aya_obj::btf::BtfKind::Func).is_ok());
    }
}
