//! A DNS server on a loopback UDP port: it answers A and AAAA queries from a table the
//! test changes while it runs (TTL 0, so resolvers ask again every time).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;

#[derive(Default)]
struct Zone {
    /// Lower-case name without the trailing dot → addresses.
    names: parking_lot::Mutex<HashMap<String, Vec<IpAddr>>>,
    queries: AtomicUsize,
}

/// A running server; stops when dropped.
pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<Zone>,
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    pub async fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns");
        let addr = socket.local_addr().expect("dns addr");
        let zone = Arc::new(Zone::default());
        let serving = Arc::clone(&zone);
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                if let Some(answer) = answer(&serving, &buf[..n]) {
                    let _ = socket.send_to(&answer, peer).await;
                }
            }
        });
        Self { addr, zone, task }
    }

    /// Sets the addresses `name` resolves to (none: the name does not exist).
    pub fn set(&self, name: &str, addresses: &[IpAddr]) {
        let key = name.trim_end_matches('.').to_ascii_lowercase();
        self.zone.names.lock().insert(key, addresses.to_vec());
    }

    /// How many queries it has answered.
    pub fn queries(&self) -> usize {
        self.zone.queries.load(Ordering::Relaxed)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(zone: &Zone, packet: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(packet).ok()?;
    zone.queries.fetch_add(1, Ordering::Relaxed);
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.message_type = MessageType::Response;
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    let names = zone.names.lock();
    let mut known = false;
    for query in &request.queries {
        response.add_query(query.clone());
        let key = query
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let Some(addresses) = names.get(&key) else {
            continue;
        };
        known = true;
        for ip in addresses {
            let rdata = match (query.query_type(), ip) {
                (RecordType::A, IpAddr::V4(v4)) => RData::A(A(*v4)),
                (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(*v6)),
                _ => continue,
            };
            response.add_answer(Record::from_rdata(query.name().clone(), 0, rdata));
        }
    }
    if !known {
        response.metadata.response_code = ResponseCode::NXDomain;
    }
    response.to_vec().ok()
}
