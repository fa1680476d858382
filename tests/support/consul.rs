//! A real Consul client library (py-consul, from PyPI) driven from the tests: each call runs
//! `consul_driver.py` (next to this file) in a `python3` process and returns its JSON answer.
//!
//! [`ensure_py_consul`] installs py-consul with pip when `import consul` fails (Debian's
//! `python3-consul` when pip cannot), once per test binary; when that is impossible the test
//! fails with what to install, it never skips.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

fn driver() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/consul_driver.py")
}

fn imports() -> bool {
    Command::new("python3")
        .args(["-c", "import consul, consul.std"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Makes `import consul` work in `python3` (py-consul from PyPI), or panics saying why.
pub fn ensure_py_consul() {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let ready = READY.get_or_init(|| {
        if imports() {
            return Ok(());
        }
        let mut tried = Vec::new();
        // a Debian system python refuses plain pip installs (PEP 668): then as the user
        for extra in [&[][..], &["--user", "--break-system-packages"][..]] {
            let out = Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .args(extra)
                .arg("py-consul")
                .output();
            match out {
                Ok(o) if o.status.success() && imports() => return Ok(()),
                Ok(o) => tried.push(String::from_utf8_lossy(&o.stderr).into_owned()),
                Err(e) => tried.push(e.to_string()),
            }
        }
        // no pip at all: Debian's packaged client (python-consul, the library py-consul continues)
        let apt = Command::new("apt-get")
            .args(["install", "-y", "-qq", "python3-consul"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output();
        match apt {
            Ok(o) if o.status.success() && imports() => return Ok(()),
            Ok(o) => tried.push(String::from_utf8_lossy(&o.stderr).into_owned()),
            Err(e) => tried.push(format!("apt-get: {e}")),
        }
        Err(tried.join("\n"))
    });
    if let Err(e) = ready {
        panic!(
            "the Consul tests need the py-consul client library (`python3 -m pip install \
             py-consul`, or Debian's python3-consul), and installing it failed:\n{e}"
        );
    }
}

/// py-consul pointed at one switchyard's Consul API.
pub struct ConsulClient {
    pub port: u16,
    pub token: Option<String>,
}

impl ConsulClient {
    pub fn new(port: u16) -> ConsulClient {
        ensure_py_consul();
        ConsulClient { port, token: None }
    }

    pub fn with_token(port: u16, token: &str) -> ConsulClient {
        ConsulClient {
            token: Some(token.to_string()),
            ..ConsulClient::new(port)
        }
    }

    /// Runs one driver operation (see `consul_driver.py`) and returns its JSON.
    pub async fn call(&self, args: &[&str]) -> Value {
        let mut cmd = tokio::process::Command::new("python3");
        cmd.arg(driver()).arg(self.port.to_string()).arg(args[0]);
        if let Some(t) = &self.token {
            cmd.arg(format!("--token={t}"));
        }
        cmd.args(&args[1..]);
        let out = cmd
            .output()
            .await
            .unwrap_or_else(|e| panic!("running python3 {}: {e}", driver().display()));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "consul_driver.py {args:?} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("consul_driver.py {args:?} printed no JSON ({e}): {stdout}"))
    }

    pub async fn register(&self, registration: Value) -> Value {
        self.call(&["register", &registration.to_string()]).await
    }

    /// `health.service(name)`: (index, nodes).
    pub async fn health(&self, name: &str, passing: bool) -> (u64, Vec<Value>) {
        let mut args = vec!["health", name];
        if passing {
            args.push("passing");
        }
        let v = self.call(&args).await;
        let nodes = v["nodes"]
            .as_array()
            .unwrap_or_else(|| panic!("health {name}: {v}"))
            .clone();
        (v["index"].as_u64().unwrap_or(0), nodes)
    }
}

/// The statuses of one health entry's checks other than the node's own (`serfHealth`).
pub fn service_check_statuses(entry: &Value) -> Vec<String> {
    entry["Checks"]
        .as_array()
        .map(|checks| {
            checks
                .iter()
                .filter(|c| c["CheckID"] != "serfHealth")
                .map(|c| c["Status"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}
