//! Listening sockets for the TCPStore server: dual-stack `[::]` when the
//! host has IPv6, `0.0.0.0` otherwise, or an explicit bind address; always
//! with SO_REUSEADDR (as PyTorch) and the kernel's full accept backlog.

use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::error::Error;

/// The kernel's cap on a listen backlog (`/proc/sys/net/core/somaxconn`).
pub fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Binds and listens on `port` (0 picks a free one) at `address`, or on
/// every interface (dual-stack when IPv6 is available) when `None`.
pub fn listen(address: Option<IpAddr>, port: u16) -> io::Result<TcpListener> {
    match address {
        Some(ip) => listen_on(SocketAddr::new(ip, port), false),
        None => listen_on(
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
            true,
        )
        .or_else(|_| {
            listen_on(
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
                false,
            )
        }),
    }
}

/// Checks that `fd` is a TCP socket (IPv4 or IPv6, stream), the kind a
/// server can be handed over to serve on, before it is taken over.
pub fn check_tcp_socket(fd: RawFd) -> io::Result<()> {
    let not_tcp = || io::Error::new(io::ErrorKind::InvalidInput, "not a TCP socket");
    let domain = int_option(fd, libc::SOL_SOCKET, libc::SO_DOMAIN).map_err(|_| not_tcp())?;
    let kind = int_option(fd, libc::SOL_SOCKET, libc::SO_TYPE).map_err(|_| not_tcp())?;
    match (domain, kind) {
        (libc::AF_INET | libc::AF_INET6, libc::SOCK_STREAM) => Ok(()),
        _ => Err(not_tcp()),
    }
}

/// Serves on `fd`, a TCP socket handed over by the caller (PyTorch's
/// `master_listen_fd`, `serve --listen-fd`): one already listening, or one
/// bound and not yet listening, which PyTorch's server accepts too (it
/// listens on it; on a listening socket, listen(2) only sets the backlog).
pub fn listen_on_socket(fd: OwnedFd) -> io::Result<TcpListener> {
    check_tcp_socket(fd.as_raw_fd())?;
    // SAFETY: listen(2) on a TCP socket the server now owns.
    check(unsafe { libc::listen(fd.as_raw_fd(), backlog()) })?;
    Ok(TcpListener::from(fd))
}

/// The listen backlog: the kernel's cap.
fn backlog() -> libc::c_int {
    somaxconn().map_or(libc::SOMAXCONN, |n| n.min(i32::MAX as u32) as i32)
}

/// Makes a listening socket non-blocking, with TCP_NODELAY for the
/// connections it accepts (Linux copies it to them: no call per client).
pub fn prepare_listener(listener: &TcpListener) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    set_int_option(
        listener.as_raw_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_NODELAY,
        1,
    )
}

/// PyTorch's error for a server that cannot listen (launchers match on its
/// text, e.g. torchelastic's retry on "address already in use").
pub fn listen_error(address: Option<IpAddr>, port: u16, e: &io::Error) -> Error {
    let errno = e.raw_os_error().unwrap_or(0);
    let (name, message) = uv_error(errno)
        .map(|(n, m)| (n.to_string(), m.to_string()))
        .unwrap_or_else(|| (format!("E{errno}"), e.to_string().to_lowercase()));
    let use_ipv6 = address.is_none_or(|a| a.is_ipv6());
    Error::network(format!(
        "The server socket has failed to listen on any local network address. \
         port: {port}, useIpv6: {use_ipv6}, code: {}, name: {name}, message: {message}",
        -errno
    ))
}

/// libuv's name and message for the errors binding commonly meets.
fn uv_error(errno: i32) -> Option<(&'static str, &'static str)> {
    Some(match errno {
        libc::EADDRINUSE => ("EADDRINUSE", "address already in use"),
        libc::EADDRNOTAVAIL => ("EADDRNOTAVAIL", "address not available"),
        libc::EACCES => ("EACCES", "permission denied"),
        libc::EAFNOSUPPORT => ("EAFNOSUPPORT", "address family not supported"),
        libc::EINVAL => ("EINVAL", "invalid argument"),
        libc::EMFILE => ("EMFILE", "too many open files"),
        _ => return None,
    })
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn int_option(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: reads an int option into a live c_int of `len` bytes; any
    // descriptor number is safe to ask about (a bad one fails).
    check(unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

fn set_int_option(
    fd: libc::c_int,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its size.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn listen_on(addr: SocketAddr, dual_stack: bool) -> io::Result<TcpListener> {
    let domain = if addr.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: plain socket(2); the result is checked and then owned.
    let raw = check(unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_int_option(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if addr.is_ipv6() {
        set_int_option(
            raw,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            i32::from(!dual_stack),
        )?;
    }
    let (storage, len) = to_sockaddr(addr);
    // SAFETY: `storage` holds a sockaddr of `len` bytes.
    check(unsafe { libc::bind(raw, (&storage as *const libc::sockaddr_storage).cast(), len) })?;
    // SAFETY: listen(2) on our bound socket.
    check(unsafe { libc::listen(raw, backlog()) })?;
    Ok(TcpListener::from(fd))
}

fn to_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;

    #[test]
    fn dual_stack_accepts_v4_and_v6() {
        let l = listen(None, 0).unwrap();
        let port = l.local_addr().unwrap().port();
        assert_ne!(port, 0);
        TcpStream::connect(("127.0.0.1", port)).unwrap();
        if l.local_addr().unwrap().is_ipv6() {
            TcpStream::connect(("::1", port)).unwrap();
        }
    }

    #[test]
    fn accepted_connections_inherit_nodelay_from_the_listener() {
        let l = listen(Some(IpAddr::V4(Ipv4Addr::LOCALHOST)), 0).unwrap();
        prepare_listener(&l).unwrap();
        let _client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let accepted = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert!(accepted.nodelay().unwrap());
    }

    #[test]
    fn a_port_in_use_is_reported_in_pytorchs_words() {
        let l = listen(Some(IpAddr::V4(Ipv4Addr::LOCALHOST)), 0).unwrap();
        let port = l.local_addr().unwrap().port();
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let e = listen(Some(ip), port).unwrap_err();
        assert_eq!(
            listen_error(Some(ip), port, &e).message(),
            format!(
                "The server socket has failed to listen on any local network address. \
                 port: {port}, useIpv6: false, code: -98, name: EADDRINUSE, \
                 message: address already in use"
            )
        );
    }

    #[test]
    fn explicit_loopback_bind() {
        let l = listen(Some(IpAddr::V4(Ipv4Addr::LOCALHOST)), 0).unwrap();
        assert_eq!(
            l.local_addr().unwrap().ip(),
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        );
    }
}
