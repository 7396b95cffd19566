//! End-to-end tests: the real Envoy with the built filter, the real `knocker` binary and
//! real HTTP targets, all on loopback and free ports. One binary, one module per area.

mod broadcast;
mod configs;
mod durability;
mod link;
mod monitors;
mod protocol;
mod rules;
mod settings;
mod stack;

use std::time::Duration;

/// Every wait in these tests is bounded by this (or a shorter, stated bound).
pub const WAIT: Duration = Duration::from_secs(20);

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// A body of `n` bytes that is not one repeated byte (so truncation or reordering shows).
pub fn body(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}
