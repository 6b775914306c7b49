//! Test helper: opens a file or connects through syscalls that cat, curl and python do not
//! use, so the tests can prove attribution does not depend on the syscall.
//!   enforcer-test-helper openat2 PATH
//!   enforcer-test-helper uring-open PATH
//!   enforcer-test-helper uring-connect IP PORT
//!   enforcer-test-helper open-loop PATH N   (prints "ns <per open+close>", "cpu_ns <..>" before "ok")
//!   enforcer-test-helper udp-connect-flood IP PORT SECONDS (connect(2)s a UDP socket as fast
//!   as it can, for the alert-displacement flood; prints the count and rate on stderr)
//! Prints "ok <pid>" on success, exits 1 with the error otherwise.
use std::ffi::CString;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let r = match args.get(1).map(String::as_str) {
        Some("openat2") => openat2(&args[2]),
        Some("uring-open") => uring_open(&args[2]),
        Some("open-loop") => open_loop(&args[2], args[3].parse().expect("count")),
        Some("uring-connect") => {
            uring_connect(args[2].parse().expect("ip"), args[3].parse().expect("port"))
        }
        Some("udp-connect-flood") => udp_connect_flood(
            args[2].parse().expect("ip"),
            args[3].parse().expect("port"),
            args[4].parse().expect("seconds"),
        ),
        _ => Err(
            "usage: openat2 PATH | uring-open PATH | open-loop PATH N | uring-connect IP PORT | \
                  udp-connect-flood IP PORT SECONDS"
                .into(),
        ),
    };
    match r {
        Ok(()) => println!("ok {}", std::process::id()),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

/// Opens and closes `path` `n` times; prints the mean cost of one open+close in ns, wall
/// clock (`ns`) and this thread's CPU time (`cpu_ns`: what the kernel charged the opener, not
/// what other processes, such as the daemon reading the records, took meanwhile).
fn open_loop(path: &str, n: u32) -> Result<(), String> {
    let c = CString::new(path).unwrap();
    let cpu = || {
        let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        t.tv_sec as u128 * 1_000_000_000 + t.tv_nsec as u128
    };
    let cpu_start = cpu();
    let start = std::time::Instant::now();
    for _ in 0..n {
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(format!("open: {}", std::io::Error::last_os_error()));
        }
        unsafe { libc::close(fd) };
    }
    println!("ns {}", start.elapsed().as_nanos() / n.max(1) as u128);
    println!("cpu_ns {}", (cpu() - cpu_start) / n.max(1) as u128);
    Ok(())
}

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

fn openat2(path: &str) -> Result<(), String> {
    let c = CString::new(path).unwrap();
    let how = OpenHow { flags: libc::O_RDONLY as u64, mode: 0, resolve: 0 };
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const OpenHow,
            size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(format!("openat2: {}", std::io::Error::last_os_error()));
    }
    unsafe { libc::close(fd as i32) };
    Ok(())
}

fn uring_open(path: &str) -> Result<(), String> {
    let mut ring = io_uring::IoUring::new(4).map_err(|e| e.to_string())?;
    let c = CString::new(path).unwrap();
    let op = io_uring::opcode::OpenAt::new(io_uring::types::Fd(libc::AT_FDCWD), c.as_ptr())
        .flags(libc::O_RDONLY)
        .build();
    unsafe { ring.submission().push(&op).map_err(|e| e.to_string())? };
    ring.submit_and_wait(1).map_err(|e| e.to_string())?;
    let cqe = ring.completion().next().ok_or("no completion")?;
    if cqe.result() < 0 {
        return Err(format!(
            "io_uring openat: {}",
            std::io::Error::from_raw_os_error(-cqe.result())
        ));
    }
    unsafe { libc::close(cqe.result()) };
    Ok(())
}

fn uring_connect(ip: IpAddr, port: u16) -> Result<(), String> {
    let addr = SocketAddr::new(ip, port);
    let (domain, storage, len) = sockaddr(addr);
    let sock = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    let mut ring = io_uring::IoUring::new(4).map_err(|e| e.to_string())?;
    let op = io_uring::opcode::Connect::new(
        io_uring::types::Fd(sock),
        &storage as *const _ as *const libc::sockaddr,
        len,
    )
    .build();
    unsafe { ring.submission().push(&op).map_err(|e| e.to_string())? };
    ring.submit_and_wait(1).map_err(|e| e.to_string())?;
    let cqe = ring.completion().next().ok_or("no completion")?;
    let _ = ring.as_raw_fd();
    unsafe { libc::close(sock) };
    if cqe.result() < 0 {
        return Err(format!(
            "io_uring connect: {}",
            std::io::Error::from_raw_os_error(-cqe.result())
        ));
    }
    Ok(())
}

fn sockaddr(addr: SocketAddr) -> (i32, libc::sockaddr_storage, u32) {
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            (libc::AF_INET, storage, size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: 0,
            };
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            (libc::AF_INET6, storage, size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

fn udp_connect_flood(ip: IpAddr, port: u16, seconds: f64) -> Result<(), String> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let to = SocketAddr::new(ip, port);
    let t0 = std::time::Instant::now();
    let mut n: u64 = 0;
    while t0.elapsed().as_secs_f64() < seconds {
        for _ in 0..1024 {
            s.connect(to).map_err(|e| format!("connect {to}: {e}"))?;
        }
        n += 1024;
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    eprintln!("{n} connects in {:.2} s ({rate:.0}/s)", t0.elapsed().as_secs_f64());
    Ok(())
}
