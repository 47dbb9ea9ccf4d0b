//! The admin index page: server-rendered HTML tables of the same JSON the
//! API returns. No script; every value is HTML-escaped.

use std::fmt::Write as _;

use serde_json::Value;

/// Renders the whole page.
pub(crate) fn render(sessions: &Value, certs: &Value, healthy: bool, ready: bool) -> String {
    let mut out = String::with_capacity(4096);
    out.push_str(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>mcp-tls-gateway admin</title>\
         <style>body{font-family:sans-serif;margin:1.5em}\
         table{border-collapse:collapse;margin-bottom:1.5em}\
         th,td{border:1px solid #bbb;padding:.2em .5em;text-align:left;font-size:90%}\
         th{background:#eee}.bad{color:#b00}.good{color:#070}</style>\
         </head><body>\n<h1>mcp-tls-gateway</h1>\n",
    );
    let state = |ok: bool, yes: &str, no: &str| {
        if ok {
            format!("<span class=\"good\">{yes}</span>")
        } else {
            format!("<span class=\"bad\">{no}</span>")
        }
    };
    let _ = writeln!(
        out,
        "<p>Health: {} &middot; Readiness: {} &middot; \
         <a href=\"/metrics\">metrics</a> &middot; <a href=\"/sessions\">sessions (JSON)</a> \
         &middot; <a href=\"/certs\">certificates (JSON)</a></p>",
        state(healthy, "healthy", "unhealthy"),
        state(ready, "ready", "not ready"),
    );
    table(&mut out, "Sessions", sessions);
    table(&mut out, "Certificates", certs);
    out.push_str("</body></html>\n");
    out
}

/// One `<h2>` and a table whose columns are the union of the objects' keys
/// (in first-seen order). Anything but an array of objects is shown as
/// escaped JSON.
fn table(out: &mut String, title: &str, value: &Value) {
    let rows = match value.as_array() {
        Some(rows) => rows,
        None => {
            let _ = writeln!(
                out,
                "<h2>{}</h2>\n<pre>{}</pre>",
                escape(title),
                escape(&value.to_string())
            );
            return;
        }
    };
    let _ = writeln!(out, "<h2>{} ({})</h2>", escape(title), rows.len());
    if rows.is_empty() {
        out.push_str("<p>none</p>\n");
        return;
    }
    let mut columns: Vec<&str> = Vec::new();
    for row in rows {
        if let Some(obj) = row.as_object() {
            for k in obj.keys() {
                if !columns.contains(&k.as_str()) {
                    columns.push(k);
                }
            }
        }
    }
    out.push_str("<table><tr>");
    if columns.is_empty() {
        out.push_str("<th>value</th>");
    }
    for c in &columns {
        let _ = write!(out, "<th>{}</th>", escape(c));
    }
    out.push_str("</tr>\n");
    for row in rows {
        out.push_str("<tr>");
        match row.as_object() {
            Some(obj) if !columns.is_empty() => {
                for c in &columns {
                    let _ = write!(out, "<td>{}</td>", escape(&cell(obj.get(*c))));
                }
            }
            _ => {
                let _ = write!(
                    out,
                    "<td colspan=\"{}\">{}</td>",
                    columns.len().max(1),
                    escape(&cell(Some(row)))
                );
            }
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
}

/// A cell's text: strings as they are, null and absent as empty, anything
/// else as compact JSON.
fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// Escapes text for HTML element content and attribute values.
pub(crate) fn escape(s: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_and_keys_are_escaped() {
        let sessions = json!([
            {"sni": "<script>alert(1)</script>", "peer": "10.0.0.1:5", "bytes": 12},
            {"sni": "a&b", "<k>": {"x": "\"q\""}}
        ]);
        let html = render(&sessions, &json!([]), true, false);
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>"));
        assert!(html.contains("<td>a&amp;b</td>"));
        assert!(html.contains("<th>&lt;k&gt;</th>"));
        assert!(html.contains("{&quot;x&quot;:&quot;\\&quot;q\\&quot;&quot;}"));
        assert!(html.contains("<td>12</td>"));
        assert!(html.contains("Sessions (2)"));
        assert!(html.contains("not ready"));
    }

    #[test]
    fn rows_missing_a_column_get_an_empty_cell() {
        let html = render(&json!([{"a": 1}, {"b": 2}]), &json!([]), true, true);
        assert!(html.contains("<tr><th>a</th><th>b</th></tr>"), "{html}");
        assert!(html.contains("<tr><td>1</td><td></td></tr>"), "{html}");
        assert!(html.contains("<tr><td></td><td>2</td></tr>"), "{html}");
    }

    #[test]
    fn non_array_is_shown_as_escaped_json() {
        let html = render(&json!({"e": "<b>"}), &json!(null), true, true);
        assert!(html.contains("<pre>{&quot;e&quot;:&quot;&lt;b&gt;&quot;}</pre>"));
        assert!(html.contains("<pre>null</pre>"));
    }
}
