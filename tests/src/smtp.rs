//! A real SMTP server on loopback: aiosmtpd (installed in `.tools/venv` by the set-up)
//! saving every message it accepts into a maildir the test reads.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{free_port, repo_root, require, temp_dir};

/// One accepted message.
#[derive(Debug, Clone)]
pub struct Email {
    pub subject: String,
    /// Envelope recipients (`X-RcptTo`).
    pub to: String,
    pub from: String,
    pub message_id: String,
    pub text: String,
}

/// A running server; stopped when dropped.
pub struct SmtpServer {
    pub port: u16,
    maildir: PathBuf,
    child: Child,
}

impl SmtpServer {
    pub fn start() -> Self {
        let python = require(
            repo_root().join(".tools/venv/bin/python"),
            "run `scripts/setup.sh` (make test does it)",
        );
        let port = free_port();
        let dir = temp_dir("smtp");
        let maildir = dir.join("maildir");
        let log = std::fs::File::create(dir.join("smtp.log")).expect("smtp log");
        let child = Command::new(python)
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&maildir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start aiosmtpd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "aiosmtpd did not start listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            port,
            maildir,
            child,
        }
    }

    /// Every message so far, oldest first.
    pub fn messages(&self) -> Vec<Email> {
        let mut files: Vec<(std::time::SystemTime, PathBuf)> =
            std::fs::read_dir(self.maildir.join("new"))
                .into_iter()
                .flatten()
                .filter_map(|e| {
                    let e = e.ok()?;
                    Some((e.metadata().ok()?.modified().ok()?, e.path()))
                })
                .collect();
        files.sort();
        files
            .into_iter()
            .filter_map(|(_, path)| std::fs::read_to_string(path).ok())
            .map(|raw| parse(&raw))
            .collect()
    }

    /// Waits until `n` messages have arrived (fails the test after `timeout`).
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Email> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let got = self.messages();
            if got.len() >= n {
                return got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "SMTP server got {} of {n} messages in {timeout:?}: {got:#?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse(raw: &str) -> Email {
    let (head, text) = raw
        .replace("\r\n", "\n")
        .split_once("\n\n")
        .map(|(h, t)| (h.to_owned(), t.to_owned()))
        .unwrap_or_default();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
            .unwrap_or_default()
    };
    Email {
        subject: header("subject"),
        to: header("x-rcptto"),
        from: header("from"),
        message_id: header("message-id"),
        text,
    }
}
