//! Helpers shared by the integration tests: a `distcore serve` process.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};

/// Tells apart the namespaces one test process creates.
static NEXT_NETNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A `distcore serve` process, killed when dropped.
pub struct Serve {
    /// The process.
    pub child: Child,
    /// The port it listens on.
    pub port: u16,
    /// Its standard output, kept open.
    _stdout: BufReader<ChildStdout>,
}

impl Serve {
    /// On loopback, on a free port.
    pub fn start() -> Serve {
        Serve::start_with(None, &["--port", "0"])
    }

    /// With `open_files` as both its soft and hard descriptor limit, and
    /// `args` after `serve --host 127.0.0.1` (a port at least).
    pub fn start_with(open_files: Option<u64>, args: &[&str]) -> Serve {
        let mut command = Command::new(env!("CARGO_BIN_EXE_distcore"));
        command.args(["serve", "--host", "127.0.0.1"]).args(args);
        Serve::spawn(command, open_files)
    }

    /// In the network namespace `netns`, on a free port, with `args` after
    /// `serve`.
    pub fn start_in(netns: &str, args: &[&str]) -> Serve {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", netns, env!("CARGO_BIN_EXE_distcore")]);
        command.args(["serve", "--port", "0"]).args(args);
        Serve::spawn(command, None)
    }

    fn spawn(mut command: Command, open_files: Option<u64>) -> Serve {
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        if let Some(n) = open_files {
            // SAFETY: setrlimit is async-signal-safe; nothing else runs here.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().expect("distcore serve");
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut line).unwrap();
        let port = line
            .split_whitespace()
            .nth(5)
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        Serve {
            child,
            port,
            _stdout: stdout,
        }
    }

    pub fn field(&self, name: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    }

    /// Resident memory, in MiB.
    pub fn rss_mib(&self) -> f64 {
        self.field("VmRSS:") as f64 / 1024.0
    }

    /// CPU time used so far, in seconds.
    pub fn cpu_secs(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after_name.split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn stderr(&mut self) -> ChildStderr {
        self.child.stderr.take().unwrap()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    /// Sends `signal` to the process (SIGSTOP freezes it, SIGCONT thaws it).
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as libc::pid_t, signal) },
            0
        );
    }
}

/// A network namespace with a veth pair to this one; removed when dropped.
pub struct Netns {
    /// Its name.
    pub name: String,
    /// The address of the namespace's end.
    pub inside: String,
    /// The address of this namespace's end.
    pub outside: String,
}

pub fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// Creates it (root, iproute2).
    pub fn create() -> Result<Netns, String> {
        let id = std::process::id() % 100_000;
        let n = NEXT_NETNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("dcns{id}n{n}");
        let (outer, inner) = (format!("dcv{id}a{n}"), format!("dcv{id}b{n}"));
        let net = format!("10.{}.{}", 231 + n % 20, id % 250);
        let netns = Netns {
            name: name.clone(),
            inside: format!("{net}.2"),
            outside: format!("{net}.1"),
        };
        run(&["ip", "netns", "add", &name])?;
        run(&[
            "ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ])?;
        run(&["ip", "link", "set", &inner, "netns", &name])?;
        run(&["ip", "addr", "add", &format!("{net}.1/30"), "dev", &outer])?;
        run(&["ip", "link", "set", &outer, "up"])?;
        netns.exec(&["ip", "addr", "add", &format!("{net}.2/30"), "dev", &inner])?;
        netns.exec(&["ip", "link", "set", &inner, "up"])?;
        netns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// Runs `args` inside it.
    pub fn exec(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Drops every packet into the namespace, or lets them in again.
    pub fn partition(&self, cut: bool) {
        let action = if cut { "-A" } else { "-D" };
        self.exec(&["iptables", action, "INPUT", "-j", "DROP"])
            .unwrap();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes the veth pair with it.
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}
