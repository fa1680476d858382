//! `switchyard register` and `switchyard services` against a real etcd, real backends and the
//! real switchyard binary: leases, deregistration, etcd restarts, health gating, wrapped commands.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use support::traffic::Traffic;
use support::{eventually, free_port, Backend, EtcdCluster, EtcdServer, Proxy};

const PATIENCE: Duration = Duration::from_secs(10);

/// A `switchyard register ...` (or `services ...`) process; killed by pid on drop.
struct Cmd {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Cmd {
    fn start(args: &[String]) -> Cmd {
        let dir = tempfile::tempdir().expect("temp dir for switchyard");
        let stdout = std::fs::File::create(dir.path().join("stdout")).expect("stdout file");
        let stderr = std::fs::File::create(dir.path().join("stderr")).expect("stderr file");
        let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("starting switchyard");
        Cmd {
            child: Some(child),
            dir,
        }
    }

    fn register(etcd: &EtcdServer, args: &[&str]) -> Cmd {
        let mut all = vec![
            "register".to_string(),
            "--etcd".to_string(),
            etcd.endpoint(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        Cmd::start(&all)
    }

    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .expect("process running")
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {sig} failed");
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(self.path("stdout")).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.path("stderr")).unwrap_or_default()
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits for the exit status, with bounded patience.
    async fn wait_exit(&mut self, patience: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.try_status() {
                return s;
            }
            if start.elapsed() > patience {
                panic!(
                    "switchyard did not exit within {patience:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Cmd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = Command::new("kill")
                    .args(["-KILL", &c.id().to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- switchyard stdout ----\n{}\n---- switchyard stderr ----\n{}",
                self.stdout(),
                self.stderr()
            );
        }
    }
}

/// The key's value and lease, if present.
async fn get_key(etcd: &EtcdServer, key: &str) -> Result<Option<(String, i64)>, String> {
    let mut c = etcd.client().await;
    let resp = tokio::time::timeout(Duration::from_secs(2), c.get(key, None))
        .await
        .map_err(|_| "etcd get timed out".to_string())?
        .map_err(|e| format!("etcd get: {e}"))?;
    Ok(resp
        .kvs()
        .first()
        .map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease())))
}

async fn wait_present(etcd: &EtcdServer, key: &str, patience: Duration) -> (String, i64) {
    eventually(patience, &format!("{key} to be registered"), || async {
        get_key(etcd, key)
            .await?
            .ok_or_else(|| "key absent".to_string())
    })
    .await
}

async fn wait_absent(etcd: &EtcdServer, key: &str, patience: Duration) {
    eventually(patience, &format!("{key} to be removed"), || async {
        match get_key(etcd, key).await? {
            None => Ok(()),
            Some((v, lease)) => Err(format!("still present: {v} (lease {lease})")),
        }
    })
    .await
}

/// Asserts that `key` stays present for all of `hold` (polled).
async fn stays_present(etcd: &EtcdServer, key: &str, hold: Duration) {
    let start = Instant::now();
    while start.elapsed() < hold {
        match get_key(etcd, key).await {
            Ok(Some(_)) => {}
            other => panic!(
                "{key} should stay registered, but after {:?}: {other:?}",
                start.elapsed()
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn lease_ttls(etcd: &EtcdServer, lease: i64) -> (i64, i64) {
    let r = etcd
        .client()
        .await
        .lease_time_to_live(lease, None)
        .await
        .expect("lease time-to-live");
    (r.granted_ttl(), r.ttl())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_writes_key_under_lease_and_proxy_routes() {
    let etcd = EtcdServer::start();
    let proxy = Proxy::builder(&etcd).start().await;
    let backend = Backend::start("web-1").await;
    let addr = backend.addr_string();
    let _reg = Cmd::register(
        &etcd,
        &[
            "--service",
            "web",
            "--addr",
            &addr,
            "--id",
            "one",
            "--ttl",
            "5",
            "--weight",
            "3",
            "--meta",
            "zone=a",
        ],
    );
    let (value, lease) = wait_present(&etcd, "/services/web/one", PATIENCE).await;
    let v: serde_json::Value = serde_json::from_str(&value).expect("value is json");
    assert_eq!(v["addr"], addr.as_str());
    assert_eq!(v["weight"], 3);
    assert_eq!(v["metadata"]["zone"], "a");
    assert_ne!(lease, 0, "the key must carry a lease");
    let (granted, ttl) = lease_ttls(&etcd, lease).await;
    assert_eq!(granted, 5, "granted ttl should be the --ttl asked for");
    assert!(ttl > 0, "lease should be alive, ttl {ttl}");
    eventually(PATIENCE, "web to be routed to web-1", || async {
        let (status, body) = proxy.get_service("web", "/").await;
        if status == 200 && body.contains("web-1") {
            Ok(())
        } else {
            Err(format!("{status} {body}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_registrar_key_expires_within_ttl() {
    let etcd = EtcdServer::start();
    let reg = Cmd::register(
        &etcd,
        &[
            "--service",
            "web",
            "--addr",
            "127.0.0.1:1",
            "--id",
            "k",
            "--ttl",
            "2",
        ],
    );
    wait_present(&etcd, "/services/web/k", PATIENCE).await;
    reg.signal("-KILL");
    let killed = Instant::now();
    // etcd expires leases on a 500 ms tick: allow the TTL plus that and some scheduling slack
    wait_absent(&etcd, "/services/web/k", Duration::from_millis(3500)).await;
    assert!(
        killed.elapsed() >= Duration::from_millis(1000),
        "key vanished after {:?}: it should live on its lease, not be deleted",
        killed.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_deregisters_at_once_and_exits_zero() {
    let etcd = EtcdServer::start();
    let mut reg = Cmd::register(
        &etcd,
        &[
            "--service",
            "web",
            "--addr",
            "127.0.0.1:1",
            "--id",
            "t",
            "--ttl",
            "30",
        ],
    );
    let (_, lease) = wait_present(&etcd, "/services/web/t", PATIENCE).await;
    reg.signal("-TERM");
    let status = reg.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    // exited means deregistered: no waiting for the 30 s TTL
    assert_eq!(get_key(&etcd, "/services/web/t").await, Ok(None));
    let (_, ttl) = lease_ttls(&etcd, lease).await;
    assert_eq!(ttl, -1, "lease {lease} should be revoked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_deregisters_too() {
    let etcd = EtcdServer::start();
    let mut reg = Cmd::register(
        &etcd,
        &[
            "--service",
            "web",
            "--addr",
            "127.0.0.1:1",
            "--id",
            "i",
            "--ttl",
            "30",
        ],
    );
    wait_present(&etcd, "/services/web/i", PATIENCE).await;
    reg.signal("-INT");
    let status = reg.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "exit status after SIGINT");
    assert_eq!(get_key(&etcd, "/services/web/i").await, Ok(None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_with_data_keeps_registration() {
    let mut etcd = EtcdServer::start();
    let reg = Cmd::register(
        &etcd,
        &[
            "--service",
            "web",
            "--addr",
            "127.0.0.1:1",
            "--id",
            "r",
            "--ttl",
            "3",
        ],
    );
    wait_present(&etcd, "/services/web/r", PATIENCE).await;
    etcd.restart();
    wait_present(&etcd, "/services/web/r", PATIENCE).await;
    // longer than the TTL twice over: the lease is being kept alive again
    stays_present(&etcd, "/services/web/r", Duration::from_secs(7)).await;
    let (_, lease) = wait_present(&etcd, "/services/web/r", PATIENCE).await;
    let (granted, ttl) = lease_ttls(&etcd, lease).await;
    assert_eq!(granted, 3);
    assert!(ttl > 0, "lease alive, ttl {ttl}");
    drop(reg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_wiped_registrar_writes_key_again() {
    let mut etcd = EtcdServer::start();
    let reg = Cmd::register(
        &etcd,
        &[
            "--service",
            "web",
            "--addr",
            "127.0.0.1:1",
            "--id",
            "w",
            "--ttl",
            "3",
        ],
    );
    wait_present(&etcd, "/services/web/w", PATIENCE).await;
    etcd.wipe_and_restart();
    let (_, lease) = wait_present(&etcd, "/services/web/w", Duration::from_secs(5)).await;
    let (granted, ttl) = lease_ttls(&etcd, lease).await;
    assert_eq!(granted, 3, "the new lease has the asked ttl");
    assert!(ttl > 0, "new lease alive, ttl {ttl}");
    assert!(
        reg.stderr().contains("registering again"),
        "the registrar should log the re-registration; stderr:\n{}",
        reg.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_etcd_at_start_is_retried() {
    let mut etcd = EtcdServer::start();
    etcd.kill();
    let mut reg = Cmd::register(
        &etcd,
        &["--service", "web", "--addr", "127.0.0.1:1", "--id", "u"],
    );
    // still trying after a few failed attempts
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        assert!(
            reg.try_status().is_none(),
            "register must keep retrying while etcd is down; stderr:\n{}",
            reg.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    etcd.restart();
    wait_present(&etcd, "/services/web/u", PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_check_removes_key_and_passing_restores_it() {
    let etcd = EtcdServer::start();
    let backend = Backend::start("checked").await;
    let addr = backend.addr_string();
    let check = format!("http://{addr}/health");
    let reg = Cmd::register(
        &etcd,
        &[
            "--service",
            "web",
            "--addr",
            &addr,
            "--id",
            "c",
            "--ttl",
            "30",
            "--check",
            &check,
            "--check-interval-ms",
            "200",
        ],
    );
    wait_present(&etcd, "/services/web/c", PATIENCE).await;
    backend.set_health(503);
    // removed by the registrar, not by the 30 s lease
    wait_absent(&etcd, "/services/web/c", Duration::from_secs(3)).await;
    backend.set_health(200);
    wait_present(&etcd, "/services/web/c", Duration::from_secs(3)).await;
    let log = reg.stderr();
    assert_eq!(
        log.matches("check failing").count(),
        1,
        "one flip to failing, logged once; stderr:\n{log}"
    );
    assert_eq!(
        log.matches("check passing").count(),
        2,
        "first pass and one flip back, logged once each; stderr:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_failing_from_the_start_never_registers() {
    let etcd = EtcdServer::start();
    let backend = Backend::start("sick").await;
    backend.set_health(500);
    let addr = backend.addr_string();
    let check = format!("http://{addr}/health");
    let reg = Cmd::register(
        &etcd,
        &[
            "--service",
            "web",
            "--addr",
            &addr,
            "--id",
            "s",
            "--check",
            &check,
            "--check-interval-ms",
            "100",
        ],
    );
    eventually(PATIENCE, "the failing check to be logged", || async {
        if reg.stderr().contains("check failing") {
            Ok(())
        } else {
            Err(reg.stderr())
        }
    })
    .await;
    assert_eq!(get_key(&etcd, "/services/web/s").await, Ok(None));
    backend.set_health(200);
    wait_present(&etcd, "/services/web/s", Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrapped_child_exit_deregisters_and_propagates_code() {
    let etcd = EtcdServer::start();
    let backend = Backend::start("wrapped").await;
    let addr = backend.addr_string();
    let mut reg = Cmd::register(
        &etcd,
        &[
            "--service",
            "web",
            "--addr",
            &addr,
            "--id",
            "x",
            "--ttl",
            "30",
            "--",
            "sh",
            "-c",
            "sleep 2; exit 7",
        ],
    );
    wait_present(&etcd, "/services/web/x", Duration::from_secs(2)).await;
    let status = reg.wait_exit(PATIENCE).await;
    assert_eq!(status.code(), Some(7), "the child's exit code is passed on");
    assert_eq!(get_key(&etcd, "/services/web/x").await, Ok(None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrapped_child_does_not_outlive_a_killed_registrar() {
    let etcd = EtcdServer::start();
    let backend = Backend::start("orphan").await;
    let addr = backend.addr_string();
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("child.pid");
    let script = format!("echo $$ > {}; exec sleep 60", pidfile.display());
    let reg = Cmd::register(
        &etcd,
        &[
            "--service",
            "web",
            "--addr",
            &addr,
            "--id",
            "o",
            "--ttl",
            "30",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    wait_present(&etcd, "/services/web/o", Duration::from_secs(5)).await;
    let child_pid = eventually(PATIENCE, "the child's pid file", || async {
        std::fs::read_to_string(&pidfile)
            .map_err(|e| e.to_string())
            .and_then(|s| s.trim().parse::<u32>().map_err(|e| e.to_string()))
    })
    .await;
    reg.signal("-KILL");
    eventually(PATIENCE, "the orphaned child to be terminated", || async {
        let alive = std::process::Command::new("kill")
            .args(["-0", &child_pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        // a zombie still answers kill -0; its state in /proc says Z
        let zombie = std::fs::read_to_string(format!("/proc/{child_pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true);
        (!alive || zombie)
            .then_some(())
            .ok_or("child still running".to_string())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrapped_child_registers_once_reachable_and_gets_signals() {
    let etcd = EtcdServer::start();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut reg = Cmd::register(
        &etcd,
        &[
            "--service",
            "web",
            "--addr",
            &addr,
            "--id",
            "late",
            "--",
            "sleep",
            "60",
        ],
    );
    eventually(
        PATIENCE,
        "the registrar to wait for the service",
        || async {
            if reg.stderr().contains("waiting for the service") {
                Ok(())
            } else {
                Err(reg.stderr())
            }
        },
    )
    .await;
    assert_eq!(
        get_key(&etcd, "/services/web/late").await,
        Ok(None),
        "not registered before the address accepts connections"
    );
    let _backend = Backend::start_on("late", &addr).await;
    wait_present(&etcd, "/services/web/late", Duration::from_secs(3)).await;
    reg.signal("-TERM");
    let status = reg.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(
        status.code(),
        Some(128 + 15),
        "sleep killed by the forwarded SIGTERM exits 143"
    );
    assert_eq!(get_key(&etcd, "/services/web/late").await, Ok(None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_json_matches_registration() {
    let etcd = EtcdServer::start();
    let _reg = Cmd::register(
        &etcd,
        &[
            "--service",
            "api",
            "--addr",
            "127.0.0.1:4001",
            "--id",
            "a1",
            "--weight",
            "2",
            "--meta",
            "zone=b",
            "--meta",
            "v=2",
        ],
    );
    let (_, lease) = wait_present(&etcd, "/services/api/a1", PATIENCE).await;
    etcd.put("/services/plain/p1", "10.0.0.9:80").await;
    etcd.put("/services/plain/bad", "not an address").await;
    let mut cmd = Cmd::start(&[
        "services".into(),
        "--etcd".into(),
        etcd.endpoint(),
        "--json".into(),
    ]);
    let status = cmd.wait_exit(PATIENCE).await;
    assert!(status.success(), "services --json failed: {}", cmd.stderr());
    let rows: serde_json::Value =
        serde_json::from_str(&cmd.stdout()).expect("services --json prints json");
    let rows = rows.as_array().expect("a json array");
    assert_eq!(rows.len(), 3, "three registrations: {rows:?}");
    let find = |key: &str| {
        rows.iter()
            .find(|r| r["key"] == key)
            .unwrap_or_else(|| panic!("{key} missing from {rows:?}"))
    };
    let a = find("/services/api/a1");
    assert_eq!(a["service"], "api");
    assert_eq!(a["id"], "a1");
    assert_eq!(a["addr"], "127.0.0.1:4001");
    assert_eq!(a["weight"], 2);
    assert_eq!(a["metadata"]["zone"], "b");
    assert_eq!(a["metadata"]["v"], "2");
    assert_eq!(a["lease"], lease);
    let p = find("/services/plain/p1");
    assert_eq!(p["addr"], "10.0.0.9:80");
    assert_eq!(p["weight"], 1);
    assert_eq!(p["lease"], 0);
    let bad = find("/services/plain/bad");
    assert!(bad["addr"].is_null());
    assert!(bad["error"].as_str().is_some_and(|e| !e.is_empty()));

    // the table names every instance too
    let mut table = Cmd::start(&["services".into(), "--etcd".into(), etcd.endpoint()]);
    assert!(table.wait_exit(PATIENCE).await.success());
    let out = table.stdout();
    for want in ["SERVICE", "a1", "127.0.0.1:4001", "zone=b", "p1", "INVALID"] {
        assert!(out.contains(want), "table should contain {want:?}:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_watch_prints_each_change_and_survives_etcd_restart() {
    let mut etcd = EtcdServer::start();
    etcd.put("/services/web/a", "10.0.0.1:80").await;
    etcd.put("/services/web-admin/z", "10.0.0.9:80").await;
    let json = Cmd::start(&[
        "services".into(),
        "--etcd".into(),
        etcd.endpoint(),
        "--prefix".into(),
        "/services/".into(),
        "--json".into(),
        "--watch".into(),
    ]);
    let table = Cmd::start(&[
        "services".into(),
        "--etcd".into(),
        etcd.endpoint(),
        "--watch".into(),
    ]);
    let lines = |cmd: &Cmd| -> Vec<serde_json::Value> {
        cmd.stdout()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?} is not json: {e}")))
            .collect()
    };
    eventually(PATIENCE, "the initial list", || async {
        let l = lines(&json);
        match l.first() {
            Some(first) if first["event"] == "list" => Ok(()),
            _ => Err(format!("{l:?}")),
        }
    })
    .await;
    let first = &lines(&json)[0];
    assert_eq!(first["instances"].as_array().map(|a| a.len()), Some(2));

    etcd.put("/services/web/b", r#"{"addr":"10.0.0.2:80","weight":4}"#)
        .await;
    etcd.delete("/services/web/a").await;
    eventually(PATIENCE, "a put and a delete line", || async {
        let l = lines(&json);
        let put = l
            .iter()
            .any(|v| v["event"] == "put" && v["key"] == "/services/web/b" && v["weight"] == 4);
        let del = l
            .iter()
            .any(|v| v["event"] == "delete" && v["key"] == "/services/web/a" && v["id"] == "a");
        if put && del {
            Ok(())
        } else {
            Err(format!("{l:?}"))
        }
    })
    .await;
    eventually(PATIENCE, "table watch lines", || async {
        let out = table.stdout();
        if out.contains("+ web b 10.0.0.2:80 weight=4") && out.contains("- web a") {
            Ok(())
        } else {
            Err(out)
        }
    })
    .await;

    // etcd goes away and comes back: the watch is re-created and keeps printing
    etcd.restart();
    etcd.put("/services/web/c", "10.0.0.3:80").await;
    eventually(
        Duration::from_secs(15),
        "a change after the etcd restart",
        || async {
            let out = table.stdout();
            if out.contains("+ web c 10.0.0.3:80 weight=1") {
                Ok(())
            } else {
                Err(out)
            }
        },
    )
    .await;
    let out = table.stdout();
    assert_eq!(
        out.matches("+ web c").count(),
        1,
        "each change printed once:\n{out}"
    );
}

/// Runs switchyard with `args`; asserts a non-zero exit and exactly one error line.
async fn assert_rejected(args: &[String], mention: &str) {
    let mut cmd = Cmd::start(args);
    let status = cmd.wait_exit(Duration::from_secs(15)).await;
    let err = cmd.stderr();
    assert!(!status.success(), "{args:?} should fail; stderr:\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: one error line expected, got:\n{err}"
    );
    assert!(
        lines[0].contains(mention),
        "{args:?}: error should mention {mention:?}: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_exits_nonzero_with_one_error_line() {
    let etcd = EtcdServer::start();
    let reg = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["register".into(), "--etcd".into(), etcd.endpoint()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    assert_rejected(
        &reg(&["--service", "bad name", "--addr", "127.0.0.1:80"]),
        "\"bad name\"",
    )
    .await;
    assert_rejected(&reg(&["--service", "web", "--addr", "nope"]), "\"nope\"").await;
    assert_rejected(
        &reg(&["--service", "web", "--addr", "127.0.0.1:99999"]),
        "99999",
    )
    .await;
    assert_rejected(
        &reg(&[
            "--service",
            "web",
            "--addr",
            "127.0.0.1:80",
            "--meta",
            "novalue",
        ]),
        "\"novalue\"",
    )
    .await;
    assert_rejected(
        &reg(&["--service", "web", "--addr", "127.0.0.1:80", "--ttl", "0"]),
        "--ttl 0",
    )
    .await;
    assert_rejected(
        &reg(&[
            "--service",
            "web",
            "--addr",
            "127.0.0.1:80",
            "--check",
            "https://127.0.0.1/health",
        ]),
        "only http://",
    )
    .await;
    assert_rejected(
        &[
            "register".into(),
            "--etcd".into(),
            "http://bad host:2379".into(),
            "--service".into(),
            "web".into(),
            "--addr".into(),
            "127.0.0.1:80".into(),
        ],
        "bad host",
    )
    .await;
    assert_rejected(
        &reg(&[
            "--service",
            "web",
            "--addr",
            "127.0.0.1:80",
            "--",
            "/nonexistent/command",
        ]),
        "/nonexistent/command",
    )
    .await;
    // nothing was registered by any of them
    let mut c = etcd.client().await;
    let all = c
        .get(
            "/services/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("etcd get");
    assert!(all.kvs().is_empty(), "bad input must not register anything");

    // services against an etcd that is not there
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    assert_rejected(
        &["services".into(), "--etcd".into(), nowhere.clone()],
        &nowhere,
    )
    .await;
}

/// How long the member the registrar keeps its lease alive through stays frozen: longer than the
/// default TTL (10 s), so the key stays only if the registrar reaches etcd through another member.
const FROZEN_FOR: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_hung_member_under_the_keep_alive_the_instance_stays_registered_and_routed() {
    let mut cluster = EtcdCluster::start();
    let proxy = Proxy::builder_endpoints(cluster.endpoints()).start().await;
    let backend = Backend::start("web-1").await;
    let mut args = vec!["register".to_string()];
    for e in cluster.endpoints() {
        args.extend(["--etcd".to_string(), e]);
    }
    let addr = backend.addr_string();
    args.extend(["--service", "web", "--addr", &addr, "--id", "one"].map(String::from));
    // the default TTL: 10 s
    let mut reg = Cmd::start(&args);
    let key = "/services/web/one";
    wait_present(cluster.live(), key, PATIENCE).await;
    proxy.wait_usable("web", 1).await;
    // a keep-alive every 3.3 s (a third of the TTL); a follower, so the cluster keeps its leader
    // and only the registrar's member hangs
    let mut hung = cluster.keeping_alive(Duration::from_secs(4)).await;
    if cluster.leader().await == hung {
        cluster.move_leader((hung + 1) % 3).await;
        hung = cluster.keeping_alive(Duration::from_secs(4)).await;
    }
    let traffic = Traffic::start(&proxy, "web");
    traffic.wait_more(20).await;
    let (_, lease) = wait_present(cluster.live(), key, PATIENCE).await;
    cluster.freeze(hung);
    let frozen = Instant::now();
    // polled through a live member: the key never disappears, under its lease or a new one
    let mut leases = vec![lease];
    while frozen.elapsed() < FROZEN_FOR {
        match get_key(cluster.live(), key).await {
            Ok(Some((_, l))) if leases.last() == Some(&l) => {}
            Ok(Some((_, l))) => {
                eprintln!("the key moved to lease {l} after {:?}", frozen.elapsed());
                leases.push(l);
            }
            other => panic!(
                "{key} must stay registered while member {hung} hangs, but after {:?}: {other:?} \
                 (leases so far: {leases:?})",
                frozen.elapsed()
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lease = leases.last().copied().unwrap_or(0);
    let (_, ttl) = lease_ttls(cluster.live(), lease).await;
    assert!(ttl > 0, "the key's lease {lease} must be alive, ttl {ttl}");
    // left once for good: a client that goes back to the hung member loses a keep-alive or a
    // grant there each time, and lives on the TTL's margin
    assert!(
        leases.len() <= 2,
        "the registrar must leave the hung member once: one new lease at most, got {leases:?}"
    );
    let to_hung = support::connections_to(reg.pid(), cluster.member(hung).client_port);
    assert_eq!(
        to_hung, 0,
        "the registrar must hold no connection to the hung member (a request on it waits for \
         its timeout)"
    );
    // back: the key stays through more than a keep-alive period, under a live lease
    cluster.thaw(hung);
    stays_present(cluster.live(), key, Duration::from_secs(4)).await;
    let (_, lease) = wait_present(cluster.live(), key, PATIENCE).await;
    let (_, ttl) = lease_ttls(cluster.live(), lease).await;
    assert!(
        ttl > 0,
        "after the thaw the key's lease {lease} must be alive, ttl {ttl}"
    );
    traffic.wait_more(20).await;
    let n = traffic.assert_all_succeeded().await;
    eprintln!("{n} requests, all 200; leases {leases:?}");
    // and it deregisters as ever
    reg.signal("-TERM");
    wait_absent(cluster.live(), key, PATIENCE).await;
    let status = reg.wait_exit(PATIENCE).await;
    assert!(
        status.success(),
        "register must exit 0 on SIGTERM, got {status}"
    );
}
