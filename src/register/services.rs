//! `switchyard services`: what etcd has under the prefix, as a table or JSON.
//!
//! With `--watch`, the current list is printed first, then one line per change from revision
//! R+1 on (prefix with a trailing '/'):
//!
//! ```text
//! + user-service 10.0.0.7:50051 10.0.0.7:50051 weight=1 zone=a     (new instance)
//! ~ user-service 10.0.0.7:50051 10.0.0.7:50051 weight=0            (value changed)
//! - user-service 10.0.0.7:50051                                    (removed)
//! ```
//!
//! With `--json --watch` every line is one JSON object: first
//! `{"event":"list","revision":R,"instances":[...]}`, then `{"event":"put",...instance}` and
//! `{"event":"delete","revision":..,"service":..,"id":..,"key":..}`.
//!
//! A broken watch (etcd down, compaction, etcd wiped) is followed by a re-list with backoff; the
//! difference from what was printed is printed as changes, so the output stays a faithful log.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use serde_json::json;
use tracing::{info, warn};

use super::{connect, etcd_error, normalized_prefix, runtime, timed, RegisterError};
use crate::cli::ServicesArgs;
use crate::registry::{codec, Backoff};

/// Deadline of one list or watch-create request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// One row of `services` output.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ListedInstance {
    pub service: String,
    pub id: String,
    pub key: String,
    pub addr: Option<String>,
    pub weight: Option<u32>,
    pub metadata: BTreeMap<String, String>,
    pub lease: i64,
    pub error: Option<String>,
}

impl ListedInstance {
    fn from_kv(prefix: &str, key: &[u8], value: &[u8], lease: i64) -> ListedInstance {
        let (service, id) = match codec::decode_key(prefix, key) {
            Ok(p) => (p.service.to_string(), p.instance.to_string()),
            Err(_) => (
                codec::service_of_key(prefix, key).unwrap_or("").to_string(),
                String::new(),
            ),
        };
        let (addr, weight, metadata, error) = match codec::decode_value(value) {
            Ok(r) => (Some(r.addr.to_string()), Some(r.weight), r.metadata, None),
            Err(e) => (None, None, BTreeMap::new(), Some(e.to_string())),
        };
        ListedInstance {
            service,
            id,
            key: String::from_utf8_lossy(key).into_owned(),
            addr,
            weight,
            metadata,
            lease,
            error,
        }
    }

    /// Same registration, ignoring the lease (a re-grant is not a change of what is registered).
    fn same_registration(&self, other: &ListedInstance) -> bool {
        self.addr == other.addr
            && self.weight == other.weight
            && self.metadata == other.metadata
            && self.error == other.error
    }

    /// Instance id, or the whole key when the key does not have the expected shape.
    fn label(&self) -> &str {
        if self.id.is_empty() {
            &self.key
        } else {
            &self.id
        }
    }
}

/// Lists the prefix; returns the instances and the revision they are valid at.
async fn list(client: &mut Client, prefix: &str) -> Result<(Vec<ListedInstance>, i64), String> {
    let resp = timed(
        "list",
        REQUEST_TIMEOUT,
        client.get(prefix.as_bytes(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let rows = resp
        .kvs()
        .iter()
        .map(|kv| ListedInstance::from_kv(prefix, kv.key(), kv.value(), kv.lease()))
        .collect();
    Ok((rows, revision))
}

/// Renders instances as a table grouped by service.
pub fn render_table(rows: &[ListedInstance]) -> String {
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str("no services registered\n");
        return out;
    }
    let w_svc = rows
        .iter()
        .map(|r| r.service.len())
        .max()
        .unwrap_or(7)
        .max(7);
    let w_id = rows
        .iter()
        .map(|r| r.label().len())
        .max()
        .unwrap_or(8)
        .max(8);
    out.push_str(&format!(
        "{:<w_svc$}  {:<w_id$}  {:<21}  {:>6}  METADATA\n",
        "SERVICE", "INSTANCE", "ADDRESS", "WEIGHT"
    ));
    for r in rows {
        let addr = r
            .addr
            .clone()
            .unwrap_or_else(|| format!("INVALID: {}", r.error.clone().unwrap_or_default()));
        let weight = r
            .weight
            .map(|w| w.to_string())
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<w_svc$}  {:<w_id$}  {:<21}  {:>6}  {}\n",
            r.service,
            r.label(),
            addr,
            weight,
            meta_text(r)
        ));
    }
    out
}

fn meta_text(r: &ListedInstance) -> String {
    r.metadata
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// One change seen by `--watch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchLine {
    Added(ListedInstance),
    Changed(ListedInstance),
    Removed(ListedInstance),
}

impl WatchLine {
    /// The line printed for this change; `json` selects JSON lines.
    pub fn render(&self, revision: i64, json: bool) -> String {
        if json {
            let v = match self {
                WatchLine::Added(r) | WatchLine::Changed(r) => {
                    let mut v = json!({"event": "put", "revision": revision});
                    if let (Some(obj), Ok(serde_json::Value::Object(inst))) =
                        (v.as_object_mut(), serde_json::to_value(r))
                    {
                        obj.extend(inst);
                    }
                    v
                }
                WatchLine::Removed(r) => json!({
                    "event": "delete",
                    "revision": revision,
                    "service": r.service,
                    "id": r.id,
                    "key": r.key,
                }),
            };
            return v.to_string();
        }
        match self {
            WatchLine::Added(r) | WatchLine::Changed(r) => {
                let sign = if matches!(self, WatchLine::Added(_)) {
                    '+'
                } else {
                    '~'
                };
                let what = match (&r.addr, r.weight) {
                    (Some(addr), Some(w)) => format!("{addr} weight={w}"),
                    _ => format!("INVALID: {}", r.error.clone().unwrap_or_default()),
                };
                let meta = meta_text(r);
                let sep = if meta.is_empty() { "" } else { " " };
                format!("{sign} {} {} {what}{sep}{meta}", r.service, r.label())
            }
            WatchLine::Removed(r) => format!("- {} {}", r.service, r.label()),
        }
    }
}

/// What `--watch` has printed so far, by key; turns events and re-lists into lines.
#[derive(Debug, Default)]
pub struct Printed {
    known: BTreeMap<String, ListedInstance>,
}

impl Printed {
    pub fn put(&mut self, row: ListedInstance) -> Option<WatchLine> {
        match self.known.insert(row.key.clone(), row.clone()) {
            None => Some(WatchLine::Added(row)),
            Some(old) if old.same_registration(&row) => None,
            Some(_) => Some(WatchLine::Changed(row)),
        }
    }

    pub fn delete(&mut self, key: &str) -> Option<WatchLine> {
        self.known.remove(key).map(WatchLine::Removed)
    }

    /// Replaces everything with a fresh list; returns the differences.
    pub fn reset(&mut self, rows: Vec<ListedInstance>) -> Vec<WatchLine> {
        let fresh: BTreeMap<String, ListedInstance> =
            rows.into_iter().map(|r| (r.key.clone(), r)).collect();
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|k| !fresh.contains_key(*k))
            .cloned()
            .collect();
        let mut lines: Vec<WatchLine> = gone.iter().filter_map(|k| self.delete(k)).collect();
        for row in fresh.into_values() {
            lines.extend(self.put(row));
        }
        lines
    }
}

/// Writes one line to stdout and flushes; false when stdout is gone (`| head`).
fn emit(line: &str) -> bool {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|_| out.flush()).is_ok()
}

/// Why one watch stream ended.
enum WatchEnd {
    /// stdout closed: stop quietly.
    OutputClosed,
    /// Re-list and resume: broken stream, compaction, etcd restarted.
    Resync(String),
}

/// Follows the prefix from `revision + 1`, printing changes, until the stream breaks.
async fn follow(
    client: &mut Client,
    prefix: &str,
    revision: &mut i64,
    printed: &mut Printed,
    json: bool,
    backoff: &mut Backoff,
) -> WatchEnd {
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(*revision + 1);
    let mut stream = match timed(
        "watch",
        REQUEST_TIMEOUT,
        client.watch(prefix.as_bytes(), Some(opts)),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => return WatchEnd::Resync(e),
    };
    loop {
        let resp = match stream.message().await {
            Err(e) => return WatchEnd::Resync(format!("watch stream error: {e}")),
            Ok(None) => return WatchEnd::Resync("watch stream ended".into()),
            Ok(Some(r)) => r,
        };
        if resp.canceled() {
            return WatchEnd::Resync(match resp.compact_revision() {
                0 => format!("watch canceled: {}", resp.cancel_reason()),
                c => format!("revision {} was compacted (oldest {c})", *revision + 1),
            });
        }
        if resp.created() {
            backoff.reset();
            continue;
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            *revision = (*revision).max(kv.mod_revision());
            let line = match ev.event_type() {
                EventType::Put => printed.put(ListedInstance::from_kv(
                    prefix,
                    kv.key(),
                    kv.value(),
                    kv.lease(),
                )),
                EventType::Delete => printed.delete(&String::from_utf8_lossy(kv.key())),
            };
            if let Some(line) = line {
                if !emit(&line.render(kv.mod_revision(), json)) {
                    return WatchEnd::OutputClosed;
                }
            }
        }
    }
}

/// `--watch` after the first list: follow, and after every break re-list (with backoff), print
/// the difference and follow again. Runs until stdout is closed or the process is stopped.
async fn watch_forever(
    mut client: Client,
    prefix: &str,
    mut revision: i64,
    mut printed: Printed,
    json: bool,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let reason = match follow(
            &mut client,
            prefix,
            &mut revision,
            &mut printed,
            json,
            &mut backoff,
        )
        .await
        {
            WatchEnd::OutputClosed => return,
            WatchEnd::Resync(reason) => reason,
        };
        warn!(revision, reason = %reason, "watch interrupted; re-listing");
        // re-list until etcd answers; the list's revision may be lower than ours (etcd wiped)
        let (rows, rev) = loop {
            tokio::time::sleep(backoff.next_delay()).await;
            match list(&mut client, prefix).await {
                Ok(r) => break r,
                Err(e) => warn!(error = %e, "etcd unavailable; retrying with backoff"),
            }
        };
        info!(revision = rev, "watch resumed");
        revision = rev;
        for line in printed.reset(rows) {
            if !emit(&line.render(rev, json)) {
                return;
            }
        }
    }
}

async fn services(args: &ServicesArgs) -> Result<(), RegisterError> {
    let mut client = connect(&args.etcd).await?;
    let prefix = normalized_prefix(&args.etcd.prefix);
    let (rows, revision) = list(&mut client, &prefix)
        .await
        .map_err(|e| etcd_error(&args.etcd, e))?;
    let first = match (args.json, args.watch) {
        (true, true) => {
            json!({"event": "list", "revision": revision, "instances": rows}).to_string()
        }
        (true, false) => serde_json::to_string_pretty(&rows)
            .map_err(|e| etcd_error(&args.etcd, format!("cannot encode the list: {e}")))?,
        (false, _) => render_table(&rows).trim_end().to_string(),
    };
    if !emit(&first) || !args.watch {
        return Ok(());
    }
    let mut printed = Printed::default();
    for row in rows {
        printed.put(row);
    }
    watch_forever(client, &prefix, revision, printed, args.json).await;
    Ok(())
}

/// Entry point of `switchyard services`.
pub fn run_services(args: ServicesArgs) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchyard: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(services(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, value: &str) -> ListedInstance {
        ListedInstance::from_kv("/services/", key.as_bytes(), value.as_bytes(), 7)
    }

    #[test]
    fn watch_lines_describe_each_change() {
        let mut p = Printed::default();
        let added = p.put(row(
            "/services/web/a",
            r#"{"addr":"h:1","weight":2,"metadata":{"z":"a"}}"#,
        ));
        let added = added.expect("new key is a change");
        assert_eq!(added.render(5, false), "+ web a h:1 weight=2 z=a");
        let v: serde_json::Value = serde_json::from_str(&added.render(5, true)).unwrap();
        assert_eq!(v["event"], "put");
        assert_eq!(v["addr"], "h:1");
        assert_eq!(v["weight"], 2);
        assert_eq!(v["revision"], 5);
        // same value under a new lease: nothing to print
        let mut again = row(
            "/services/web/a",
            r#"{"addr":"h:1","weight":2,"metadata":{"z":"a"}}"#,
        );
        again.lease = 8;
        assert_eq!(p.put(again), None);
        let changed = p
            .put(row("/services/web/a", "h:1"))
            .expect("weight changed");
        assert_eq!(changed.render(6, false), "~ web a h:1 weight=1");
        let removed = p.delete("/services/web/a").expect("known key");
        assert_eq!(removed.render(7, false), "- web a");
        assert_eq!(p.delete("/services/web/a"), None);
        let bad = p.put(row("/services/web/b", "nope")).unwrap();
        assert!(bad.render(8, false).starts_with("+ web b INVALID: "));
    }

    #[test]
    fn reset_prints_the_difference() {
        let mut p = Printed::default();
        p.put(row("/services/web/a", "h:1"));
        p.put(row("/services/web/b", "h:2"));
        let lines = p.reset(vec![
            row("/services/web/b", "h:3"),
            row("/services/api/c", "h:4"),
        ]);
        let text: Vec<String> = lines.iter().map(|l| l.render(1, false)).collect();
        assert_eq!(
            text,
            vec!["- web a", "+ api c h:4 weight=1", "~ web b h:3 weight=1"]
        );
        assert!(p
            .reset(vec![
                row("/services/web/b", "h:3"),
                row("/services/api/c", "h:4")
            ])
            .is_empty());
    }
}
