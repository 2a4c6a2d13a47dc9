//! Vectored socket writes that never raise SIGPIPE.
//!
//! `Write::write_vectored` on a std or mio TCP stream is a plain `writev`,
//! which kills a process that has not ignored SIGPIPE (a C program linking
//! distcore, say) when the peer has gone; std's `write` avoids that with
//! `send(MSG_NOSIGNAL)`, and so does this `sendmsg`.

use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;

use crate::os;

/// Writes as much of `bufs`, in order, as the socket takes in one call; a
/// closed peer is `EPIPE`, never a signal.
pub(crate) fn send_vectored(socket: &impl AsRawFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    match bufs {
        [one] => os::send(socket.as_raw_fd(), one),
        _ => os::send_vectored(socket.as_raw_fd(), bufs),
    }
}

/// Writes as much of `buf` as the socket takes in one call (a plain
/// `send`, `MSG_NOSIGNAL`).
pub(crate) fn send_bytes(socket: &impl AsRawFd, buf: &[u8]) -> io::Result<usize> {
    os::send(socket.as_raw_fd(), buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn writes_in_order_and_reports_a_closed_peer_as_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let n = send_vectored(&client, &[IoSlice::new(b"ab"), IoSlice::new(b"cd")]).unwrap();
        assert_eq!(n, 4);
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"abcd");
        drop(server);
        // The first write after the close draws a reset; later ones fail
        // with EPIPE, which would be SIGPIPE (ending this test) with writev.
        let mut failed = false;
        for _ in 0..100 {
            if send_vectored(&client, &[IoSlice::new(b"x")]).is_err() {
                failed = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(failed, "writing to a closed peer must fail");
    }
}
