//! The status page: one self-contained HTML document (no external assets), refreshing itself.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use std::sync::Arc;

use super::AdminApp;
use crate::routing::{Service, INSTANCE_STATES};

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}\
th{background:#f3f3f3}.healthy{color:#176117}.unhealthy,.ejected{color:#b00020;font-weight:bold}\
.pending{color:#8a6d00}.draining{color:#666}.bad{color:#b00020}.ok{color:#176117}code{font-size:13px}";

/// Up to this many instances the page lists every one; above it, one summary row per service,
/// the instances of services that have any not healthy (up to about this many rows), and every
/// instance of one service with `/?service=<name>`. (At 100,000 instances the full page would be
/// tens of megabytes, rebuilt on every 2 s refresh.)
pub const FULL_LIST: usize = 500;

/// The page; `only`: the `service` query parameter, to show that service alone.
pub fn render(app: &AdminApp, only: Option<&str>) -> String {
    let table = app.table.load();
    let st = &app.status;
    let mut h = String::with_capacity(8192);
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"2\">\
         <title>switchyard</title><style>{STYLE}</style></head><body><h1>switchyard</h1>"
    );
    let (conn_class, conn) = if st.connected() {
        ("ok", "connected")
    } else {
        ("bad", "disconnected")
    };
    let _ = write!(
        h,
        "<h2>Registry</h2><table><tr><th>etcd</th><td><code>{}</code> prefix <code>{}</code></td></tr>\
         <tr><th>state</th><td class=\"{conn_class}\">{conn}, {}</td></tr>\
         <tr><th>revision</th><td>{}</td></tr><tr><th>re-lists / reconnects</th><td>{} / {}</td></tr>",
        escape(&app.etcd_endpoints.join(", ")),
        escape(&app.prefix),
        if st.ready() { "ready" } else { "not ready" },
        st.revision(),
        st.relists.load(Ordering::Relaxed),
        st.reconnects.load(Ordering::Relaxed),
    );
    if let Some(stale) = st.stale_detail() {
        let _ = write!(
            h,
            "<tr><th>view</th><td class=\"bad\">{}</td></tr>",
            escape(&stale)
        );
    } else if let Some(e) = st.last_error() {
        let _ = write!(
            h,
            "<tr><th>last error</th><td class=\"bad\">{}</td></tr>",
            escape(&e)
        );
    }
    h.push_str("</table>");

    let mut services: Vec<_> = table.services.values().collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    let instances: usize = services.iter().map(|s| s.instances.len()).sum();
    if let Some(name) = only {
        let _ = write!(h, "<h2>Service {}</h2>", escape(name));
        match table.service(name) {
            Some(s) => service_table(&mut h, s),
            None => h.push_str("<p class=\"bad\">No such service.</p>"),
        }
        h.push_str("<p><a href=\"/\">All services</a></p>");
    } else if instances <= FULL_LIST {
        let _ = write!(h, "<h2>Services ({})</h2>", services.len());
        if services.is_empty() {
            h.push_str("<p>No service registered.</p>");
        }
        for s in services {
            service_table(&mut h, s);
        }
    } else {
        summary(&mut h, &services, instances);
    }
    let failing = st.failing_names();
    if !failing.is_empty() {
        h.push_str(
            "<h2>Names not resolving</h2><table><tr><th>name</th><th>since</th>\
             <th>error</th><th>routed at</th></tr>",
        );
        for n in failing.iter().take(200) {
            let routed = n
                .last_good
                .map_or("nothing (never resolved)".to_string(), |ip| {
                    format!("{ip} (last good address)")
                });
            let _ = write!(
                h,
                "<tr><td><code>{}</code></td><td>{}</td><td class=\"bad\">{}</td><td>{}</td></tr>",
                escape(&n.name),
                crate::registry::rfc3339(n.since),
                escape(&n.error),
                escape(&routed)
            );
        }
        h.push_str("</table>");
    }
    let invalid = st.invalid_entries();
    if !invalid.is_empty() {
        h.push_str("<h2>Invalid registrations</h2><table><tr><th>key</th><th>reason</th></tr>");
        for (k, r) in invalid.iter().take(200) {
            let _ = write!(
                h,
                "<tr><td><code>{}</code></td><td class=\"bad\">{}</td></tr>",
                escape(k),
                escape(r)
            );
        }
        h.push_str("</table>");
    }
    let events = crate::events::RECENT.snapshot();
    h.push_str("<h2>Recent events</h2>");
    if events.is_empty() {
        h.push_str("<p>None.</p>");
    } else {
        h.push_str("<table><tr><th>time (UTC)</th><th>kind</th><th>event</th></tr>");
        for e in events.iter().take(30) {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                format_utc(e.at_ms),
                e.kind,
                escape(&e.message)
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</body></html>\n");
    h
}

/// One service's heading and instance table.
fn service_table(h: &mut String, s: &Service) {
    let _ = write!(
        h,
        "<h3 id=\"svc-{0}\">{0} <small>{1} of {2} usable</small></h3>\
         <table><tr><th>instance</th><th>address</th><th>weight</th><th>state</th>\
         <th>last check</th><th>in flight</th><th>requests</th><th>metadata</th></tr>",
        escape(&s.name),
        s.usable_count(),
        s.instances.len()
    );
    for i in &s.instances {
        let state = i.state_label();
        // an ejected instance says why and for how long
        let why = match i.state.outlier.ejection() {
            Some(e) => format!(
                "<br><small>{}: {} ({} s left)</small>",
                e.reason.as_str(),
                escape(&e.detail),
                e.until_ms
                    .saturating_sub(crate::clock::clock_ms())
                    .div_ceil(1000)
            ),
            None => String::new(),
        };
        let meta: Vec<String> = i
            .metadata
            .iter()
            .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
            .collect();
        let check = match i.state.last_check() {
            None => "not yet".to_string(),
            Some(c) => {
                let at = crate::clock::unix_ms(c.at);
                let class = if c.ok { "ok" } else { "bad" };
                format!(
                    "<span class=\"{class}\">{}</span> at {} ({:.1} ms)",
                    escape(&c.detail),
                    format_utc(at),
                    c.took.as_secs_f64() * 1000.0
                )
            }
        };
        let _ = write!(
            h,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td class=\"{state}\">{state}{why}</td>\
             <td>{check}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(i.id()),
            escape(&i.addr.to_string()),
            i.weight,
            i.state.inflight.load(Ordering::Relaxed),
            i.state.requests.load(Ordering::Relaxed),
            meta.join(", ")
        );
    }
    h.push_str("</table>");
    if s.invalid > 0 {
        let _ = write!(
            h,
            "<p class=\"bad\">{} invalid registration(s) skipped</p>",
            s.invalid
        );
    }
}

/// The page body for large registries: a row per service, then the services needing attention.
fn summary(h: &mut String, services: &[&Arc<Service>], instances: usize) {
    let _ = write!(
        h,
        "<h2>Services ({}, {instances} instances)</h2><p>One row per service; open one to see its \
         instances.</p><table><tr><th>service</th><th>usable</th><th>healthy</th><th>unhealthy</th>\
         <th>pending</th><th>draining</th><th>ejected</th><th>invalid registrations</th></tr>",
        services.len()
    );
    let mut attention = Vec::new();
    for s in services {
        let counts = s.state_counts();
        let name = escape(&s.name);
        let _ = write!(
            h,
            "<tr><td><a href=\"/?service={name}\">{name}</a></td><td>{} of {}</td>",
            s.usable_count(),
            s.instances.len()
        );
        for (state, n) in INSTANCE_STATES.iter().zip(counts) {
            let class = if n > 0 { state } else { "" };
            let _ = write!(h, "<td class=\"{class}\">{n}</td>");
        }
        let _ = write!(h, "<td>{}</td></tr>", s.invalid);
        if counts[0] < s.instances.len() || s.invalid > 0 {
            attention.push(*s);
        }
    }
    h.push_str("</table>");
    let _ = write!(h, "<h2>Needing attention ({})</h2>", attention.len());
    if attention.is_empty() {
        h.push_str("<p>Every instance of every service is healthy.</p>");
    }
    let mut rows = 0;
    for (n, s) in attention.iter().enumerate() {
        if rows >= FULL_LIST {
            let _ = write!(
                h,
                "<p>{} more: open them from the table above.</p>",
                attention.len() - n
            );
            break;
        }
        rows += s.instances.len();
        service_table(h, s);
    }
}

/// `HH:MM:SS.mmm` of a unix time in milliseconds (UTC; the page needs no date library).
fn format_utc(at_ms: u64) -> String {
    let secs = at_ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        at_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{new_shared_table, Health, Instance, RoutingTable, ServiceSettings};

    /// 60 services of 10 instances (over FULL_LIST); in svc-07 one instance is unhealthy.
    fn large_registry() -> AdminApp {
        let mut t = RoutingTable::default();
        for n in 0..60 {
            let name = format!("svc-{n:02}");
            let instances = (0..10)
                .map(|i| {
                    let health = if n == 7 && i == 3 {
                        Health::Unhealthy
                    } else {
                        Health::Healthy
                    };
                    Instance::for_test(&format!("{name}-inst-{i}"), 1, health)
                })
                .collect();
            let svc = Service::new(
                name.as_str().into(),
                instances,
                0,
                &ServiceSettings::default(),
            );
            t.services.insert(name.as_str().into(), Arc::new(svc));
        }
        let table = new_shared_table();
        table.store(Arc::new(t));
        AdminApp {
            table,
            status: Default::default(),
            started: std::time::Instant::now(),
            etcd_endpoints: vec!["127.0.0.1:2379".into()],
            prefix: "/services/".into(),
            proxy: None,
        }
    }

    #[test]
    fn a_large_registry_gets_a_summary_and_the_services_needing_attention() {
        let app = large_registry();
        let page = render(&app, None);
        assert!(page.contains("Services (60, 600 instances)"), "{page}");
        assert!(page.contains("<a href=\"/?service=svc-42\">svc-42</a>"));
        assert!(page.contains("Needing attention (1)"));
        // the unhealthy instance's service is listed in full, the healthy ones are not
        assert!(page.contains("<code>svc-07-inst-3</code>"));
        assert!(page.contains("<code>svc-07-inst-4</code>"));
        assert!(!page.contains("<code>svc-42-inst-0</code>"));
        assert!(page.len() < 64 * 1024, "{} bytes", page.len());

        let one = render(&app, Some("svc-42"));
        assert!(one.contains("<h2>Service svc-42</h2>"));
        for i in 0..10 {
            assert!(one.contains(&format!("<code>svc-42-inst-{i}</code>")));
        }
        assert!(!one.contains("svc-07-inst"));
        assert!(render(&app, Some("nope")).contains("No such service."));
    }

    #[test]
    fn a_small_registry_lists_every_instance() {
        let app = large_registry();
        let mut t = RoutingTable::default();
        for (name, svc) in app.table.load().services.iter().take(3) {
            t.services.insert(name.clone(), svc.clone());
        }
        app.table.store(Arc::new(t));
        let page = render(&app, None);
        assert!(page.contains("<h2>Services (3)</h2>"), "{page}");
        assert_eq!(page.matches("-inst-").count(), 30);
    }

    #[test]
    fn formats_time_of_day() {
        assert_eq!(format_utc(3_723_004), "01:02:03.004");
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
