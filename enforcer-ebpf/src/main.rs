//! enforcer kernel programs: one module per hook family.
//!
//! Data flows one way: these programs attribute kernel activity to processes and write
//! records into one ring buffer; the daemon decides and acts.
#![no_std]
#![no_main]

mod connect;
mod dns;
mod egress;
mod ipc;
mod lineage;
mod lsm;
mod maps;
mod probe;
mod sock;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
