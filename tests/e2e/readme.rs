//! Every session in the README and the guide, run exactly as typed.
//!
//! A session is a ```` ```sh ```` block after a `<!-- session -->` line. Its commands run
//! one after the other in one bash, in a private network namespace (the documented
//! fixed ports), with `knocker` on PATH as `make install` puts it. A `make run` line
//! starts `scripts/run.sh` (what `make run` runs after building) with the variables
//! written before it, and the session goes on once it says it is running. `#=>` lines
//! under a command are what its output must contain (runs of spaces count as one). A
//! command that only reads (no `-X`, no body, no writing sub-command) and does not show
//! what it should yet is run again for up to 20 s, as a person would look again.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use knocker_e2e::{repo_root, temp_dir};

/// One command of a session and what its output must contain.
#[derive(Debug)]
struct Step {
    command: String,
    expect: Vec<String>,
}

/// The sessions of a Markdown file, in order.
fn sessions(file: &str) -> Vec<Vec<Step>> {
    let text = std::fs::read_to_string(repo_root().join(file)).expect("the document");
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() != "<!-- session -->" {
            continue;
        }
        assert_eq!(
            lines.next().map(str::trim),
            Some("```sh"),
            "{file}: a session marker not followed by a sh block"
        );
        let mut steps: Vec<Step> = Vec::new();
        let mut pending = String::new();
        for line in lines.by_ref() {
            if line.trim() == "```" {
                break;
            }
            if let Some(expect) = line.trim_start().strip_prefix("#=>") {
                let step = steps.last_mut().expect("#=> after a command");
                step.expect.push(expect.trim().to_owned());
                continue;
            }
            if pending.is_empty() && (line.trim().is_empty() || line.trim_start().starts_with('#'))
            {
                continue;
            }
            match line.strip_suffix('\\') {
                Some(start) => {
                    pending.push_str(start);
                    pending.push(' ');
                }
                None => {
                    pending.push_str(line);
                    steps.push(Step {
                        command: std::mem::take(&mut pending),
                        expect: Vec::new(),
                    });
                }
            }
        }
        out.push(steps);
    }
    out
}

/// `A=1 B=2 make run …`: the variables, when the command is `make run`.
fn make_run(command: &str) -> Option<Vec<String>> {
    let code = command.split('#').next().unwrap_or_default();
    let words: Vec<&str> = code.split_whitespace().collect();
    let at = words.windows(2).position(|w| w == ["make", "run"])?;
    let vars = &words[..at];
    vars.iter()
        .all(|w| w.contains('='))
        .then(|| vars.iter().map(|w| (*w).to_owned()).collect())
}

/// Only reads: safe to run again.
fn reads_only(command: &str) -> bool {
    let code = command.split(" #").next().unwrap_or_default();
    let writes = [
        " -X ", " -d ", "--data", " replay", " delete", " pause", " resume", "&", "sleep ",
        "export ",
    ];
    !writes.iter().any(|w| code.contains(w))
}

fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The bash script that runs `steps`, leaving `out.N`, `rc.N` and `ok.N` in `dir`.
fn script(steps: &[Step], dir: &Path) -> String {
    let root = repo_root();
    let mut s = String::new();
    s.push_str("set -u\nip link set lo up\n");
    s.push_str(&format!("cd {}\n", quote(&root.display().to_string())));
    s.push_str(&format!(
        "export PATH={}:\"$PATH\"\n",
        quote(&root.join("target/release").display().to_string())
    ));
    s.push_str(&format!(
        "export KNOCKER_DATA_DIR={}\n",
        quote(&dir.join("data").display().to_string())
    ));
    let d = quote(&dir.display().to_string());
    for (n, step) in steps.iter().enumerate() {
        if let Some(vars) = make_run(&step.command) {
            s.push_str(&format!(
                "env {} scripts/run.sh > {d}/run.log 2>&1 &\n\
                 for i in $(seq 1 900); do grep -q 'Knocker is running' {d}/run.log && break; sleep 0.1; done\n\
                 grep -q 'Knocker is running' {d}/run.log; echo $? > {d}/rc.{n}; echo 1 > {d}/ok.{n}\n",
                vars.join(" ")
            ));
            continue;
        }
        for (k, e) in step.expect.iter().enumerate() {
            std::fs::write(
                dir.join(format!("exp.{n}.{k}")),
                e.split_whitespace().collect::<Vec<_>>().join(" "),
            )
            .expect("expectation");
        }
        let tries = if reads_only(&step.command) { 100 } else { 1 };
        s.push_str(&format!(
            "for t in $(seq 1 {tries}); do\n\
             {{ {cmd}\n}} > {d}/out.{n} 2>&1; echo $? > {d}/rc.{n}\n\
             ok=1; for e in {d}/exp.{n}.*; do [ -e \"$e\" ] || continue; \
             tr -s ' ' < {d}/out.{n} | grep -qF -f \"$e\" || ok=0; done\n\
             echo $ok > {d}/ok.{n}\n\
             [ $ok = 1 ] && [ \"$(cat {d}/rc.{n})\" = 0 ] && break; sleep 0.2\n\
             done\n",
            cmd = step.command,
        ));
    }
    s.push_str(&format!("echo done > {d}/done\n"));
    s
}

/// Runs session `index` of `file`; fails naming the command that did not do as written.
fn run_session(file: &str, index: usize) {
    let all = sessions(file);
    let steps = all
        .get(index)
        .unwrap_or_else(|| panic!("{file} has no session {index}"));
    let dir: PathBuf = temp_dir("session");
    let script_path = dir.join("session.sh");
    std::fs::write(&script_path, script(steps, &dir)).expect("script");
    let mut command = Command::new("env");
    command
        .args(["--default-signal=INT", "unshare", "-n", "bash"])
        .arg(&script_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn().expect("unshare and bash");
    let pgid = child.id();
    let deadline = Instant::now() + Duration::from_secs(240);
    let finished = loop {
        if dir.join("done").exists() || matches!(child.try_wait(), Ok(Some(_))) {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Stop what the session left running (make run, servers in the background).
    let group = format!("-{pgid}");
    let _ = Command::new("kill").args(["-INT", "--", &group]).status();
    std::thread::sleep(Duration::from_millis(500));
    let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
    let _ = child.wait();
    let read = |name: String| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let run_log = read("run.log".into());
    assert!(
        finished,
        "{file} session {index} did not finish in 240 s; make run:\n{run_log}"
    );
    let background = |step: &Step| {
        step.command
            .trim_end()
            .split(" #")
            .next()
            .unwrap_or_default()
            .trim_end()
            .ends_with('&')
    };
    // What the servers a session starts in the background printed (their logs go to
    // the output of the step that started them), for a failure to show.
    let servers: String = steps
        .iter()
        .enumerate()
        .filter(|(_, step)| background(step))
        .map(|(n, step)| format!("`{}`:\n{}\n", step.command, read(format!("out.{n}"))))
        .collect();
    for (n, step) in steps.iter().enumerate() {
        let (rc, ok, out) = (
            read(format!("rc.{n}")),
            read(format!("ok.{n}")),
            read(format!("out.{n}")),
        );
        assert!(
            (rc.trim() == "0" || background(step)) && ok.trim() == "1",
            "{file} session {index}: `{}` (exit {}) should show {:?}; it printed:\n{out}\n\
             make run:\n{run_log}\nservers started in the background:\n{servers}",
            step.command,
            rc.trim(),
            step.expect
        );
    }
}

#[test]
fn every_session_is_run_by_a_test() {
    assert_eq!(
        sessions("README.md").len(),
        1,
        "a new README session needs its test"
    );
    assert_eq!(
        sessions("docs/guide.md").len(),
        5,
        "a new guide session needs its test"
    );
    for steps in sessions("README.md")
        .into_iter()
        .chain(sessions("docs/guide.md"))
    {
        assert!(
            steps.iter().any(|s| !s.expect.is_empty()),
            "a session that checks nothing: {steps:?}"
        );
    }
}

#[test]
fn readme_tour() {
    run_session("README.md", 0);
}

#[test]
fn guide_capture() {
    run_session("docs/guide.md", 0);
}

#[test]
fn guide_fallback() {
    run_session("docs/guide.md", 1);
}

#[test]
fn guide_broadcast() {
    run_session("docs/guide.md", 2);
}

#[test]
fn guide_monitors() {
    run_session("docs/guide.md", 3);
}

#[test]
fn guide_nats() {
    run_session("docs/guide.md", 4);
}
