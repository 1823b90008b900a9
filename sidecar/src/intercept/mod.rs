//! Transparent interception: iptables rules and original destinations.

pub mod rules;

use std::net::{Ipv4Addr, SocketAddr};

use tokio::net::TcpStream;

/// The destination the client dialled before iptables REDIRECT sent the
/// connection to us (`SO_ORIGINAL_DST`).
///
/// `peer` (from `accept`) says which family's table to ask, without a
/// `getsockname` per connection: IPv4, also when it arrives IPv4-mapped
/// on an IPv6 socket.
pub fn original_dst(stream: &TcpStream, peer: SocketAddr) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let v4 = match peer {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    let addr = if v4 {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    addr.as_socket().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "original destination is not an IP address",
        )
    })
}

/// The proxy's own connections carry its mark (shared with the CA client,
/// which a sidecar uses with the same mark).
pub use bulwark_ca::client::connect_marked;

/// The source address of the inbound sidecar's connections to its app.
/// Loopback, so the app sees a caller on its own pod, but not 127.0.0.1:
/// the interception rules let exactly this source through on `lo`, where the
/// proxy's other dials to the pod's own address are its self-calls and go
/// to the inbound listener.
pub const APP_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// Opens a TCP connection to the app at `addr`, the pod address a peer
/// dialled, from [`APP_SOURCE`]. Not to 127.0.0.1: a port the app binds to
/// loopback only is private to the pod, and stays so behind the sidecar.
pub async fn connect_app(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
    let socket = match addr {
        SocketAddr::V4(_) => {
            let s = tokio::net::TcpSocket::new_v4()?;
            bind_address_no_port(&s);
            s.bind(SocketAddr::from((APP_SOURCE, 0)))?;
            s
        }
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_nodelay(true)?;
    socket.connect(addr).await
}

/// Lets the kernel choose the source port at `connect`, per destination, not
/// at `bind`: bound first, every app connection would need a port of its
/// own among ~28,000, the rest of the 4-tuple notwithstanding.
fn bind_address_no_port(socket: &tokio::net::TcpSocket) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor owned by `socket`, and a pointer to
    // an int that outlives the call, with its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of_val(&on) as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "IP_BIND_ADDRESS_NO_PORT");
    }
}
