//! Helpers shared by the integration tests: a `distcore serve` process.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};

/// A TCPStore handle on the server at `host:port`, with `timeout`.
pub fn client(host: &str, port: u16, timeout: std::time::Duration) -> distcore::store::TcpStore {
    distcore::store::TcpStore::new(distcore::store::TcpStoreOptions {
        host: host.into(),
        port,
        timeout,
        ..Default::default()
    })
    .unwrap()
}

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

    /// With `args` after `serve --host 127.0.0.1` (a port at least), its
    /// log going to `log` rather than to a pipe nobody reads (a server
    /// that logs much would fill it, and block).
    pub fn start_logging(log: std::fs::File, args: &[&str]) -> Serve {
        let mut command = Command::new(env!("CARGO_BIN_EXE_distcore"));
        command.args(["serve", "--host", "127.0.0.1"]).args(args);
        command.stdout(Stdio::piped()).stderr(log);
        Serve::started(command.spawn().expect("distcore serve"))
    }

    /// Listening on `host` (an address of this namespace), on a free port.
    pub fn start_on(host: &str) -> Serve {
        let mut command = Command::new(env!("CARGO_BIN_EXE_distcore"));
        command.args(["serve", "--host", host, "--port", "0"]);
        Serve::spawn(command, None)
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
        Serve::started(command.spawn().expect("distcore serve"))
    }

    /// The server `child`, once it says where it listens.
    fn started(mut child: Child) -> Serve {
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
    /// This namespace's end of the veth pair.
    outer: String,
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
            outer: outer.clone(),
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
        // Deleting the namespace removes the veth pair with it, unless
        // creating it failed before the pair's end moved in.
        let _ = run(&["ip", "netns", "del", &self.name]);
        let _ = run(&["ip", "link", "del", &self.outer]);
    }
}

/// A raw PyTorch-protocol client, byte by byte.
pub mod raw {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    /// VALIDATE with its magic.
    pub const VALIDATE: [u8; 5] = [0x00, 0xce, 0xf7, 0x85, 0x3c];
    pub const SET: u8 = 0x01;
    pub const GET: u8 = 0x03;
    pub const PING: u8 = 0x0d;

    /// A validated raw connection to `127.0.0.1:port` with a 10 s read
    /// timeout.
    pub fn raw_client(port: u16) -> TcpStream {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        s.write_all(&VALIDATE).unwrap();
        s
    }

    /// Appends `v` as a byte string.
    pub fn bytes(out: &mut Vec<u8>, v: &[u8]) {
        out.extend_from_slice(&(v.len() as u64).to_le_bytes());
        out.extend_from_slice(v);
    }

    /// A request of `command` with a key and a value.
    pub fn keyed(command: u8, key: &str, value: &[u8]) -> Vec<u8> {
        let mut out = vec![command];
        bytes(&mut out, key.as_bytes());
        bytes(&mut out, value);
        out
    }

    pub fn get_request(key: &str) -> Vec<u8> {
        let mut out = vec![GET];
        bytes(&mut out, key.as_bytes());
        out
    }

    pub fn ping_request(nonce: u32) -> Vec<u8> {
        let mut out = vec![PING];
        out.extend_from_slice(&nonce.to_le_bytes());
        out
    }

    /// A ping round trip on `s`: false if the server closed the connection.
    pub fn try_ping(s: &mut TcpStream, nonce: u32) -> bool {
        let mut reply = [0u8; 4];
        s.write_all(&ping_request(nonce)).is_ok()
            && s.read_exact(&mut reply).is_ok()
            && u32::from_le_bytes(reply) == nonce
    }

    /// A ping round trip on `s`; panics if it does not come back in time.
    pub fn ping(s: &mut TcpStream, nonce: u32) {
        assert!(try_ping(s, nonce), "ping answered");
    }

    /// A GET on `s`: the value (panics if the connection closes).
    pub fn get(s: &mut TcpStream, key: &str) -> Vec<u8> {
        try_get(s, key).expect("a GET answered")
    }

    /// A GET on `s`: the value, or None if the server closed the connection.
    pub fn try_get(s: &mut TcpStream, key: &str) -> Option<Vec<u8>> {
        s.write_all(&get_request(key)).ok()?;
        let mut len = [0u8; 8];
        s.read_exact(&mut len).ok()?;
        let mut value = vec![0; u64::from_le_bytes(len) as usize];
        s.read_exact(&mut value).ok()?;
        Some(value)
    }

    /// A SET of `key` to "v" then a GET of it on `s`: the value, or None if
    /// the server closed the connection.
    pub fn try_set_get(s: &mut TcpStream, key: &str) -> Option<Vec<u8>> {
        s.write_all(&keyed(SET, key, b"v")).ok()?;
        try_get(s, key)
    }
}
