//! `HOSTS_ONLY` (Knocker 1.4.1): the host names a client may send requests to. Checked
//! when a job is submitted (`job::spec`) and again on every hop it makes (`outbound`).

/// The `HOSTS_ONLY` allow-list: host names (with or without a port) a client may choose.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostsOnly(pub Vec<String>);

impl HostsOnly {
    /// True when the list is empty or holds `host` (an entry without a port allows every
    /// port of that host; one with a port, that port only).
    pub fn allows(&self, host_port: &str, host: &str) -> bool {
        self.0.is_empty()
            || self
                .0
                .iter()
                .any(|h| h.eq_ignore_ascii_case(host_port) || h.eq_ignore_ascii_case(host))
    }
}
