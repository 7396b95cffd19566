//! The product as a client meets it: the control plane, with or without Envoy in front.

use knocker_e2e::{ControlPlane, Envoy, EnvoyOptions, Target};

/// Which door a test's requests go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// Envoy with the knocker filter (`envoy/knocker.yaml`).
    Envoy,
    /// The control plane's own HTTP ingress.
    Direct,
}

pub const DOORS: [Door; 2] = [Door::Envoy, Door::Direct];

pub struct Stack {
    pub cp: ControlPlane,
    pub envoy: Option<Envoy>,
    /// The route's upstream behind Envoy (what pass-through traffic reaches).
    pub upstream: Target,
}

impl Stack {
    pub async fn start(door: Door, env: &[(&str, &str)]) -> Self {
        let cp = ControlPlane::start(env);
        let upstream = Target::ok().await;
        let envoy = (door == Door::Envoy).then(|| {
            Envoy::start(
                "knocker.yaml",
                &EnvoyOptions {
                    grpc_port: cp.grpc_port,
                    http_port: cp.http_port,
                    upstream_port: upstream.port(),
                    ..EnvoyOptions::default()
                },
            )
        });
        Self {
            cp,
            envoy,
            upstream,
        }
    }

    /// A URL on the door under test.
    pub fn url(&self, path: &str) -> String {
        match &self.envoy {
            Some(envoy) => envoy.url(path),
            None => self.cp.url(path),
        }
    }
}
