//! Output: human text, the percentile-spectrum SVG plot, and the
//! HdrHistogram interval log.

use crate::stats::{Latency, Report};
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2Serializer;
use hdrhistogram::Histogram;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

fn fmt_us(us: f64) -> String {
    if us >= 1_000_000.0 {
        format!("{:.2}s", us / 1_000_000.0)
    } else if us >= 1000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{us:.1}µs")
    }
}

fn latency_line(name: &str, l: &Latency) -> String {
    format!(
        "  {name:<12} p50 {:>9}  p90 {:>9}  p99 {:>9}  p99.9 {:>9}  p99.99 {:>9}  max {:>9}  (n={})\n",
        fmt_us(l.p50),
        fmt_us(l.p90),
        fmt_us(l.p99),
        fmt_us(l.p999),
        fmt_us(l.p9999),
        fmt_us(l.max),
        l.count
    )
}

/// The human-readable report.
pub fn text(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} {} ({}), {} threads, {} connections{}",
        r.mode,
        r.target,
        if r.tls { "TLS" } else { "plain" },
        r.threads,
        r.connections,
        r.rate
            .map(|x| format!(", open loop at {x:.0} req/s"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "  request {} B, response {} B{}{}; warm-up {:.1}s, measured {:.2}s",
        r.req_bytes,
        r.resp_bytes,
        if r.sse { ", SSE" } else { "" },
        if r.verify {
            ", every byte verified"
        } else {
            ""
        },
        r.warmup_s,
        r.duration_s
    );
    let _ = writeln!(
        s,
        "  {} requests, {:.1} req/s, {:.2} MiB/s ({} B in, {} B out)",
        r.requests, r.requests_per_s, r.mib_per_s, r.bytes_in, r.bytes_out
    );
    if r.mode == "handshake" {
        let _ = writeln!(
            s,
            "  {} handshakes ({} resumed), {:.1} handshakes/s",
            r.handshakes, r.resumed, r.handshakes_per_s
        );
    }
    if r.mode == "idle" {
        let _ = writeln!(
            s,
            "  {} connections established, {} open at the end, {} SSE events received",
            r.established, r.open_at_end, r.sse_events
        );
    }
    let label = if r.mode == "idle" {
        "first byte"
    } else {
        "latency"
    };
    s.push_str(&latency_line(label, &r.latency_us));
    if let Some(u) = &r.latency_uncorrected_us {
        s.push_str(&latency_line("uncorrected", u));
    }
    if r.errors_total == 0 {
        s.push_str("  errors: none\n");
    } else {
        let list: Vec<String> = r.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(s, "  errors: {} ({})", r.errors_total, list.join(", "));
    }
    let per = if r.requests > 0 {
        format!(
            ", {:.1} µs/request",
            r.client_cpu_s * 1e6 / r.requests as f64
        )
    } else {
        String::new()
    };
    let _ = writeln!(s, "  client CPU {:.2}s{per}", r.client_cpu_s);
    s
}

/// Percentile-spectrum plot (latency against percentile on the usual
/// `1/(1-p)` log axis), as a self-contained SVG (no fonts or libraries).
pub fn svg(title: &str, series: &[(&str, &Histogram<u64>)]) -> String {
    const W: f64 = 900.0;
    const H: f64 = 500.0;
    const L: f64 = 80.0;
    const R: f64 = 20.0;
    const T: f64 = 40.0;
    const B: f64 = 60.0;
    const MAX_NINES: f64 = 5.0; // up to 99.999 %
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"];
    let ymax_ns = series
        .iter()
        .map(|(_, h)| h.max())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let (unit, div) = if ymax_ns >= 2e6 {
        ("ms", 1e6)
    } else {
        ("µs", 1e3)
    };
    let ymax = nice_ceiling(ymax_ns / div);
    let x_of = |q: f64| {
        let nines = (-(1.0 - q).max(1e-12).log10()).min(MAX_NINES);
        L + (W - L - R) * nines / MAX_NINES
    };
    let y_of = |v: f64| T + (H - T - B) * (1.0 - v / ymax);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = write!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        W / 2.0,
        xml_escape(title)
    );
    for (i, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
        .iter()
        .enumerate()
    {
        let x = L + (W - L - R) * i as f64 / MAX_NINES;
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" y1="{T}" x2="{x:.1}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{label}</text>"##,
            H - B,
            H - B + 18.0
        );
    }
    for i in 0..=5 {
        let v = ymax * i as f64 / 5.0;
        let y = y_of(v);
        let _ = write!(
            s,
            r##"<line x1="{L}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - R,
            L - 6.0,
            y + 4.0,
            trim_num(v)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text><text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">latency ({unit})</text>"#,
        (L + W - R) / 2.0,
        H - 18.0,
        (T + H - B) / 2.0,
        (T + H - B) / 2.0
    );
    for (i, (name, h)) in series.iter().enumerate() {
        if h.is_empty() {
            continue;
        }
        let color = colors[i % colors.len()];
        let mut pts = String::new();
        let mut q = 0.0f64;
        // Sample the spectrum densely on the log axis.
        for k in 0..=500 {
            let nines = MAX_NINES * k as f64 / 500.0;
            let qq = 1.0 - 10f64.powf(-nines);
            if qq < q {
                continue;
            }
            q = qq;
            let v = h.value_at_quantile(q.min(1.0)) as f64 / div;
            let _ = write!(pts, "{:.1},{:.1} ", x_of(q), y_of(v));
        }
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            pts.trim_end()
        );
        let ly = T + 16.0 + 18.0 * i as f64;
        let _ = write!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{} (max {})</text>"#,
            L + 12.0,
            L + 36.0,
            L + 42.0,
            ly + 4.0,
            xml_escape(name),
            fmt_us(h.max() as f64 / 1000.0)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn trim_num(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An HdrHistogram interval log (V2 compressed histograms, values in ns,
/// `max` column in µs), readable by HdrHistogram's `HistogramLogProcessor`
/// and HdrHistogramVisualizer.
pub struct IntervalLog {
    buf: Vec<u8>,
    start: SystemTime,
    entries: Vec<(Duration, Duration, Histogram<u64>)>,
}

impl IntervalLog {
    pub fn new(start: SystemTime) -> Self {
        Self {
            buf: Vec::new(),
            start,
            entries: Vec::new(),
        }
    }

    pub fn push(&mut self, offset: Duration, len: Duration, h: Histogram<u64>) {
        self.entries.push((offset, len, h));
    }

    /// Serializes everything pushed so far.
    pub fn render(mut self, comment: &str) -> Result<Vec<u8>, String> {
        let mut ser = V2Serializer::new();
        {
            let mut w = IntervalLogWriterBuilder::new()
                .add_comment(comment)
                .with_start_time(self.start)
                .with_base_time(self.start)
                .with_max_value_divisor(1000.0)
                .begin_log_with(&mut self.buf, &mut ser)
                .map_err(|e| e.to_string())?;
            for (off, len, h) in &self.entries {
                w.write_histogram(h, *off, *len, Tag::new("latency"))
                    .map_err(|e| format!("{e:?}"))?;
            }
        }
        Ok(self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{new_hist, ThreadStats};
    use std::time::Instant;

    fn known() -> Histogram<u64> {
        let t0 = Instant::now();
        let mut s = ThreadStats::new();
        for us in 1..=1000u64 {
            s.record(t0, true, Duration::from_micros(us), None, 0, 0);
        }
        s.hist
    }

    #[test]
    fn text_report_shows_the_percentiles() {
        let mut r = Report {
            mode: "rr".into(),
            target: "http://127.0.0.1:1/mcp".into(),
            ..Default::default()
        };
        let mut s = ThreadStats::new();
        s.merge(&ThreadStats {
            hist: known(),
            requests: 1000,
            ..ThreadStats::new()
        });
        r.fill(&s, Duration::from_secs(1), false);
        let t = text(&r);
        assert!(t.contains("1000.0 req/s"), "{t}");
        assert!(t.contains("p50   500."), "{t}");
        assert!(t.contains("max    1.00ms"), "{t}");
        assert!(t.contains("errors: none"), "{t}");
    }

    #[test]
    fn svg_is_well_formed_and_has_each_series() {
        let h = known();
        let e = new_hist();
        let out = svg("t <1>", &[("a", &h), ("b", &h), ("empty", &e)]);
        assert!(out.starts_with("<svg") && out.ends_with("</svg>\n"));
        assert_eq!(out.matches("<polyline").count(), 2);
        assert!(out.contains("t &lt;1&gt;"));
        assert!(out.contains("99.999%"));
    }

    #[test]
    fn interval_log_round_trips() {
        use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
        let mut log = IntervalLog::new(SystemTime::now());
        log.push(Duration::from_secs(0), Duration::from_secs(1), known());
        log.push(Duration::from_secs(1), Duration::from_secs(1), known());
        let bytes = log.render("test").unwrap();
        let n = IntervalLogIterator::new(&bytes)
            .filter(|e| matches!(e, Ok(LogEntry::Interval(_))))
            .count();
        assert_eq!(n, 2);
    }
}
