//! Kernel struct offsets from BTF. rustc emits no CO-RE relocations, so offsets the kernel
//! programs need are read here from /sys/kernel/btf/vmlinux and handed in as globals.
use anyhow::{Context, Result, anyhow, bail};
use btfparse::{Offset, Readable, TypeInformation};

struct Bytes(Vec<u8>);

impl Readable for Bytes {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match self.0.get(start..start.saturating_add(buffer.len())) {
            Some(src) => {
                buffer.copy_from_slice(src);
                Ok(())
            }
            None => {
                Err(btfparse::Error::new(btfparse::ErrorKind::IOError, "read past the end of BTF"))
            }
        }
    }
}

pub struct KernelBtf {
    types: TypeInformation,
}

impl KernelBtf {
    pub fn load() -> Result<Self> {
        let path = "/sys/kernel/btf/vmlinux";
        let data =
            std::fs::read(path).with_context(|| format!("read {path} (kernel BTF is required)"))?;
        let types =
            TypeInformation::new(&Bytes(data)).map_err(|e| anyhow!("parse {path}: {e:?}"))?;
        Ok(KernelBtf { types })
    }

    /// Byte offset of `path` (e.g. "mm" or "arg_start", through anonymous members) in `struct name`.
    pub fn offset(&self, name: &str, path: &str) -> Result<u32> {
        let id =
            self.types.id_of(name).ok_or_else(|| anyhow!("struct {name} not in kernel BTF"))?;
        match self.types.offset_of(id, path) {
            Ok((_, Offset::ByteOffset(off))) => Ok(off),
            Ok((_, Offset::BitOffsetAndSize(..))) => bail!("{name}.{path} is a bitfield"),
            Err(e) => bail!("{name}.{path} not in kernel BTF: {e:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::KernelBtf;

    #[test]
    fn finds_offsets_through_anonymous_members() {
        let Ok(btf) = KernelBtf::load() else {
            eprintln!("SKIP: no readable kernel BTF here");
            return;
        };
        let start = btf.offset("mm_struct", "arg_start").unwrap();
        let end = btf.offset("mm_struct", "arg_end").unwrap();
        assert_eq!(end, start + 8);
        assert!(btf.offset("task_struct", "mm").unwrap() > 0);
        assert!(btf.offset("task_struct", "no_such_member").is_err());
    }
}
