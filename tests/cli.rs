//! The command line: config checking, refusing broken configs, help.

use std::process::Command;

fn switchyard(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .output()
        .expect("running switchyard");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).expect("writing config");
    p.display().to_string()
}

#[test]
fn shipped_default_config_checks_ok() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/switchyard.toml");
    let (code, out, err) = switchyard(&["check-config", path]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("ok") && out.contains("127.0.0.1:9090"),
        "{out}"
    );
}

#[test]
fn broken_configs_are_refused_naming_the_key_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[proxy]\nlisten = \"8080\"\n", "proxy.listen"),
        ("[proxy]\nread_timeout_ms = 0\n", "proxy.read_timeout_ms"),
        ("[etcd]\nendpoints = [\"nohost\"]\n", "etcd.endpoints"),
        ("[etcd]\nprefixx = \"/a/\"\n", "unknown field `prefixx`"),
        ("[proxy]\nmax_tries = \"three\"\n", "max_tries"),
        ("[routing\n", "invalid config"),
        (
            "[[routing.routes]]\nhost = \"a\"\nservice = \"no/slash\"\n",
            "routing.routes[0].service",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let path = write(&dir, &format!("bad{i}.toml"), text);
        let (code, _, err) = switchyard(&["check-config", &path]);
        assert_ne!(code, 0, "{text:?} was accepted");
        assert!(
            err.contains(want),
            "{text:?}: stderr {err:?} should mention {want:?}"
        );
        // serve refuses it too, before binding anything
        let (code, _, err) = switchyard(&["serve", "--config", &path]);
        assert_ne!(code, 0, "serve accepted {text:?}");
        assert!(err.contains(want), "serve: {err}");
    }
    let (code, _, err) = switchyard(&["check-config", "/nonexistent/switchyard.toml"]);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/switchyard.toml"), "{err}");
}

#[test]
fn flags_override_the_file_and_are_validated() {
    let (code, _, err) = switchyard(&["serve", "--listen", "not-an-address"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("proxy.listen") && err.contains("not-an-address"),
        "{err}"
    );
    let (code, _, err) = switchyard(&["serve", "--etcd", "http://"]);
    assert_ne!(code, 0);
    assert!(err.contains("etcd.endpoints"), "{err}");
}

#[test]
fn help_lists_the_subcommands() {
    let (code, out, _) = switchyard(&["--help"]);
    assert_eq!(code, 0);
    for sub in ["serve", "check-config", "register", "services"] {
        assert!(out.contains(sub), "help lacks {sub}: {out}");
    }
}
