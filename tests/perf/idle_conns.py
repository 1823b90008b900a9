# Holds N client connections open, each after one request (so the proxy has
# set up its per-connection state); writes READY_FILE, then sleeps.
import socket, sys, time

host, port, n, ready = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
req = ("GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host).encode()
socks = []
for _ in range(n):
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(req)
    got = b""
    while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < 1024:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("connection closed early")
        got += chunk
    socks.append(s)
with open(ready, "w") as f:
    f.write("ready\n")
time.sleep(600)
