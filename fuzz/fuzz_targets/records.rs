//! Ring-buffer records: `decode` must never panic or read past the buffer, whatever the bytes
//! (a short or odd record is `Malformed`), and what it returns must be consistent with them.
#![no_main]

use std::net::IpAddr;

use enforcer::records::{Record, decode};
use enforcer_common::{
    ARGS_LEN, ConnectRecord, ExecRecord, ExitRecord, FILENAME_LEN, FileOpenRecord, ForkRecord,
    IpcRecord, MAX_PROC_GRANTS, NAME_LEN, SocketRecord, UNIX_PATH_LEN, kind,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let k = data.get(..4).map(|b| u32::from_ne_bytes(b.try_into().unwrap()));
    // The record must fit: a kind whose struct is longer than the buffer is never decoded.
    let fits = |size: usize| data.len() >= size;
    match decode(data) {
        Record::Fork { grants, .. } => {
            assert!(k == Some(kind::FORK) && fits(size_of::<ForkRecord>()));
            assert!(grants.len() <= MAX_PROC_GRANTS && !grants.contains(&0));
        }
        Record::Exec { filename, argv, .. } => {
            assert!(k == Some(kind::EXEC) && fits(size_of::<ExecRecord>()));
            // Lossy UTF-8 turns one byte into at most three.
            assert!(filename.len() <= 3 * FILENAME_LEN && !filename.contains('\0'));
            assert!(argv.iter().map(|a| a.len() + 1).sum::<usize>() <= 3 * ARGS_LEN + argv.len());
            assert!(argv.iter().all(|a| !a.is_empty() && !a.contains('\0')));
        }
        Record::Exit { grants, .. } => {
            assert!(k == Some(kind::EXIT) && fits(size_of::<ExitRecord>()));
            assert!(grants.len() <= MAX_PROC_GRANTS && !grants.contains(&0));
        }
        Record::Connect(c) => {
            assert!(k == Some(kind::CONNECT) && fits(size_of::<ConnectRecord>()));
            // IPv4-mapped IPv6 always comes out as IPv4.
            if let IpAddr::V6(v6) = c.ip {
                assert!(v6.to_ipv4_mapped().is_none(), "{v6}");
            }
            assert!(!c.protocol.name().is_empty());
        }
        Record::Socket(s) => {
            assert!(k == Some(kind::SOCKET) && fits(size_of::<SocketRecord>()));
            assert!(s.subject.grants.len() == MAX_PROC_GRANTS);
        }
        Record::FileOpen(o) => {
            assert!(k == Some(kind::FILE_OPEN) && fits(size_of::<FileOpenRecord>()));
            // Lossy UTF-8 turns one byte into at most three.
            assert!(o.name.len() <= 3 * NAME_LEN && !o.name.contains('\0'));
        }
        Record::Ipc(i) => {
            assert!(k == Some(kind::IPC) && fits(size_of::<IpcRecord>()));
            assert!(i.op == "connect" || i.op == "sendto");
            // At most the sun_path bytes, lossy UTF-8 (three per byte), plus the '@'.
            assert!(i.path.len() <= 3 * UNIX_PATH_LEN + 1 && !i.path.contains('\0'));
        }
        Record::Malformed { len, kind: mk } => {
            assert_eq!(len, data.len());
            assert_eq!(mk, k.unwrap_or(0));
            // A complete record of a known kind is malformed only for an unknown family.
            match k {
                Some(kind::FORK) => assert!(!fits(size_of::<ForkRecord>())),
                Some(kind::EXEC) => assert!(!fits(size_of::<ExecRecord>())),
                Some(kind::EXIT) => assert!(!fits(size_of::<ExitRecord>())),
                Some(kind::SOCKET) => assert!(!fits(size_of::<SocketRecord>())),
                Some(kind::FILE_OPEN) => assert!(!fits(size_of::<FileOpenRecord>())),
                Some(kind::IPC) => assert!(!fits(size_of::<IpcRecord>())),
                _ => {}
            }
        }
    }
});
