//! Real gRPC peers: Python grpcio servers and clients (`grpc_peer.py`), installed with pip when
//! missing (see [`python`]). Nobody here wrote their HTTP/2 or gRPC code.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::free_port;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/grpc_peer.py")
}

/// A Python interpreter that can import grpcio and grpcio-health-checking: `python3` when it
/// can, else a virtual environment under `target/` made once with pip (a distribution's Python
/// may refuse system-wide pip installs).
pub fn python() -> &'static Path {
    static READY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let ready = READY.get_or_init(|| {
        let can_import = |py: &Path| {
            Command::new(py)
                .args(["-c", "import grpc, grpc_health.v1.health"])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let system = PathBuf::from("python3");
        if can_import(&system) {
            return Ok(system);
        }
        let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/grpc-venv");
        let py = venv.join("bin/python3");
        if can_import(&py) {
            return Ok(py);
        }
        let run = |cmd: &mut Command, what: &str| -> Result<(), String> {
            let status = cmd.status().map_err(|e| format!("{what}: {e}"))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("{what}: {status}"))
            }
        };
        if !py.exists() {
            run(
                Command::new("python3").args(["-m", "venv"]).arg(&venv),
                "python3 -m venv (Debian: apt-get install python3-venv)",
            )?;
        }
        run(
            Command::new(&py).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "grpcio",
                "grpcio-health-checking",
            ]),
            "pip install grpcio grpcio-health-checking",
        )?;
        if can_import(&py) {
            Ok(py)
        } else {
            Err("grpcio installed but not importable".into())
        }
    });
    match ready {
        Ok(p) => p,
        Err(e) => panic!("gRPC tests need python3 with grpcio and grpcio-health-checking: {e}"),
    }
}

/// A Python grpcio server (see `grpc_peer.py` for its methods).
pub struct GrpcPeer {
    pub name: String,
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl GrpcPeer {
    pub fn start(name: &str) -> GrpcPeer {
        let port = free_port();
        let mut child = Command::new(python())
            .arg(script())
            .args(["serve", name, &port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the Python gRPC server");
        let stdout = child.stdout.take().expect("gRPC server stdout");
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        assert_eq!(
            line.trim(),
            "ready",
            "the Python gRPC server {name} did not start"
        );
        GrpcPeer {
            name: name.to_string(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: Some(child),
        }
    }

    /// SIGKILL: the instance dies with its connections.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for GrpcPeer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs one client scenario of `grpc_peer.py` against `target` (host:port) with `:authority`
/// `authority` ("" = the target); returns its JSON result.
pub async fn call(target: &str, authority: &str, scenario: &str, arg: &str) -> serde_json::Value {
    run(&["call", target, authority, scenario, arg], scenario).await
}

/// [`call`] over TLS, trusting the CA in `ca_file`; `authority` is also the TLS server name.
pub async fn call_tls(
    target: &str,
    authority: &str,
    scenario: &str,
    arg: &str,
    ca_file: &Path,
) -> serde_json::Value {
    let ca = ca_file.display().to_string();
    run(&["call", target, authority, scenario, arg, &ca], scenario).await
}

async fn run(args: &[&str], scenario: &str) -> serde_json::Value {
    let out = tokio::process::Command::new(python())
        .arg(script())
        .args(args)
        .output()
        .await
        .expect("running the Python gRPC client");
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "gRPC client {scenario} printed no result ({e}): stdout {text:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A client scenario running in the background; `progress()` reads its progress lines.
pub struct Running {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Running {
    pub fn start(target: &str, authority: &str, scenario: &str, arg: &str) -> Running {
        let mut child = tokio::process::Command::new(python())
            .arg(script())
            .args(["call", target, authority, scenario, arg])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("running the Python gRPC client");
        let stdout = child.stdout.take().expect("client stdout");
        use tokio::io::AsyncBufReadExt;
        Running {
            child,
            lines: tokio::io::BufReader::new(stdout).lines(),
        }
    }

    /// The next JSON line, within `patience`.
    pub async fn next(&mut self, patience: Duration) -> serde_json::Value {
        let start = Instant::now();
        let line = tokio::time::timeout(patience, self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no line from the gRPC client within {patience:?}"))
            .expect("reading the gRPC client")
            .unwrap_or_else(|| panic!("gRPC client ended after {:?}", start.elapsed()));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
    }

    pub async fn wait(mut self) {
        let _ = self.child.wait().await;
    }
}
