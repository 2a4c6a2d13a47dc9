//! Listening sockets for the TCPStore server: dual-stack `[::]` when the
//! host has IPv6, `0.0.0.0` otherwise, or an explicit bind address; always
//! with SO_REUSEADDR (as PyTorch) and the kernel's full accept backlog.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

use parking_lot::Mutex;
use socket2::{Domain, SockRef, Socket, Type};

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
pub fn check_tcp_socket(fd: BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let not_tcp = || {
        let fd = fd.as_raw_fd();
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not a TCP socket"),
        )
    };
    let socket = SockRef::from(&fd);
    let domain = socket.domain().map_err(|_| not_tcp())?;
    let kind = socket.r#type().map_err(|_| not_tcp())?;
    match (domain, kind) {
        (Domain::IPV4 | Domain::IPV6, Type::STREAM) => Ok(()),
        _ => Err(not_tcp()),
    }
}

/// Takes over descriptor `fd`, a TCP socket this process inherited to
/// serve on (`serve --listen-fd`, a launcher's listening socket): it must
/// be open and a TCP socket ([`check_tcp_socket`]), and is then owned by
/// the result (closed when that is dropped). A descriptor that is not one
/// is left alone. Each number is taken at most once in the process's life,
/// so two owners never close it twice: a second take fails.
pub fn take_inherited_socket(fd: RawFd) -> io::Result<OwnedFd> {
    static TAKEN: Mutex<BTreeSet<RawFd>> = Mutex::new(BTreeSet::new());
    let mut taken = TAKEN.lock();
    if taken.contains(&fd) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("descriptor {fd} was taken over already"),
        ));
    }
    let owned = crate::os::adopt_inherited(fd, check_tcp_socket).map_err(|e| {
        match e.raw_os_error() == Some(libc::EBADF) {
            true => io::Error::new(e.kind(), format!("descriptor {fd} is not open")),
            false => e,
        }
    })?;
    taken.insert(fd);
    Ok(owned)
}

/// Serves on `fd`, a TCP socket handed over by the caller (PyTorch's
/// `master_listen_fd`, `serve --listen-fd`): one already listening, or one
/// bound and not yet listening, which PyTorch's server accepts too (it
/// listens on it; on a listening socket, listen(2) only sets the backlog).
pub fn listen_on_socket(fd: OwnedFd) -> io::Result<TcpListener> {
    use std::os::fd::AsFd;
    check_tcp_socket(fd.as_fd())?;
    let socket = Socket::from(fd);
    socket.listen(backlog())?;
    Ok(socket.into())
}

/// The listen backlog: the kernel's cap.
fn backlog() -> i32 {
    somaxconn().map_or(libc::SOMAXCONN, |n| n.min(i32::MAX as u32) as i32)
}

/// Makes a listening socket non-blocking, with TCP_NODELAY for the
/// connections it accepts (Linux copies it to them: no call per client).
pub fn prepare_listener(listener: &TcpListener) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    SockRef::from(listener).set_tcp_nodelay(true)
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

/// A listening socket at `addr` with SO_REUSEADDR (close-on-exec, as
/// every socket socket2 makes); IPv6 only unless `dual_stack`.
fn listen_on(addr: SocketAddr, dual_stack: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(!dual_stack)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(backlog())?;
    Ok(socket.into())
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

    #[test]
    fn an_inherited_socket_is_taken_once_and_anything_else_is_left_alone() {
        use std::os::fd::{AsRawFd, IntoRawFd};
        let listener = listen(Some(IpAddr::V4(Ipv4Addr::LOCALHOST)), 0).unwrap();
        let addr = listener.local_addr().unwrap();
        // As a launcher hands it over: a bare number this process owns.
        let fd = listener.into_raw_fd();
        let taken = take_inherited_socket(fd).unwrap();
        assert_eq!(taken.as_raw_fd(), fd);
        let again = take_inherited_socket(fd).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
        let served = listen_on_socket(taken).unwrap();
        assert_eq!(served.local_addr().unwrap(), addr);
        // A file is no TCP socket: refused, and still open afterwards.
        let file = tempfile::tempfile().unwrap();
        assert!(take_inherited_socket(file.as_raw_fd()).is_err());
        assert!(file.metadata().is_ok(), "left alone");
        assert!(take_inherited_socket(-1).is_err());
    }
}
