//! The status page: one self-contained HTML document (no external assets), refreshing itself.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use super::AdminApp;

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
th{background:#f3f3f3}.healthy{color:#176117}.unhealthy{color:#b00020;font-weight:bold}\
.pending{color:#8a6d00}.draining{color:#666}.bad{color:#b00020}.ok{color:#176117}code{font-size:13px}";

pub fn render(app: &AdminApp) -> String {
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
    if let Some(e) = st.last_error() {
        let _ = write!(
            h,
            "<tr><th>last error</th><td class=\"bad\">{}</td></tr>",
            escape(&e)
        );
    }
    h.push_str("</table>");

    let mut services: Vec<_> = table.services.values().collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    let _ = write!(h, "<h2>Services ({})</h2>", services.len());
    if services.is_empty() {
        h.push_str("<p>No service registered.</p>");
    }
    for s in services {
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
            let meta: Vec<String> = i
                .metadata
                .iter()
                .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
                .collect();
            let check = match i.state.last_check() {
                None => "not yet".to_string(),
                Some(c) => {
                    let at = crate::routing::unix_ms(c.at);
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
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td class=\"{state}\">{state}</td>\
                 <td>{check}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&i.id),
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
    use super::{escape, format_utc};

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
