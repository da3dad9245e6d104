//! A loopback TCP proxy whose connections the test can cut: what a client
//! sees when the server's side of its connection goes away (a node
//! restarted, a load balancer dropped it). Connecting to its control port
//! shuts every connection open through it down, both ways.

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

pub struct CutProxy {
    /// Where clients connect instead of the server.
    pub addr: SocketAddr,
    /// A connection here cuts every proxied connection.
    pub control: SocketAddr,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl CutProxy {
    pub fn start(upstream: SocketAddr) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let control = TcpListener::bind("127.0.0.1:0").unwrap();
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let proxy = CutProxy {
            addr: listener.local_addr().unwrap(),
            control: control.local_addr().unwrap(),
            open: open.clone(),
        };
        let accepted = open.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                {
                    let mut open = accepted.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                }
                pump(client.try_clone().unwrap(), server.try_clone().unwrap());
                pump(server, client);
            }
        });
        let cut = open;
        std::thread::spawn(move || {
            for _ in control.incoming().flatten() {
                for stream in cut.lock().unwrap().drain(..) {
                    let _ = stream.shutdown(Shutdown::Both);
                }
            }
        });
        proxy
    }

    /// Cuts every connection open through the proxy.
    pub fn cut(&self) {
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// Copies `from` to `to` until either ends, then ends both.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
