//! Transparent interception: iptables rules and original destinations.

pub mod rules;

use std::net::SocketAddr;

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

/// Opens a TCP connection to `addr` from a socket carrying the proxy's mark,
/// so the interception rules let it through. If the mark cannot be set
/// (no CAP_NET_ADMIN), the uid exclusion is what keeps it from looping.
pub async fn connect_marked(addr: SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if mark != 0
        && let Err(e) = sock.set_mark(mark)
    {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| tracing::warn!(error = %e, "cannot set SO_MARK on proxy sockets; relying on the uid exclusion"));
    }
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    let std_stream: std::net::TcpStream = sock.into();
    let socket = tokio::net::TcpSocket::from_std_stream(std_stream);
    socket.connect(addr).await
}
