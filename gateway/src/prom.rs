//! A tiny writer for the Prometheus text exposition format (version 0.0.4).
//!
//! Each metric family gets its `# HELP` and `# TYPE` lines once, before its
//! first sample, however many label sets are written for it. Callers write
//! all samples of one family together (the format requires families not to
//! be interleaved).

use std::collections::HashSet;
use std::fmt::Write as _;

/// The counts of a histogram's finite buckets, in bucket order.
#[derive(Debug, Clone, Copy)]
pub enum BucketCounts<'a> {
    /// Observations `<= bound[i]` (already cumulative, non-decreasing).
    Cumulative(&'a [u64]),
    /// Observations in `(bound[i-1], bound[i]]` only; the writer sums them.
    /// A trailing extra entry (the overflow bucket) is allowed and ignored:
    /// the `+Inf` bucket is always the total `count`.
    PerBucket(&'a [u64]),
}

/// A gauge sample value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GaugeValue {
    /// An integer value, written exactly.
    Int(i64),
    /// A floating-point value (`NaN`, `+Inf`, `-Inf` spelled as Prometheus does).
    Float(f64),
}

impl From<i64> for GaugeValue {
    fn from(v: i64) -> Self {
        GaugeValue::Int(v)
    }
}

impl From<u32> for GaugeValue {
    fn from(v: u32) -> Self {
        GaugeValue::Int(i64::from(v))
    }
}

impl From<u64> for GaugeValue {
    fn from(v: u64) -> Self {
        i64::try_from(v).map_or(GaugeValue::Float(v as f64), GaugeValue::Int)
    }
}

impl From<f64> for GaugeValue {
    fn from(v: f64) -> Self {
        GaugeValue::Float(v)
    }
}

/// Builds a Prometheus text exposition in memory.
#[derive(Debug, Default)]
pub struct PromWriter {
    out: String,
    families: HashSet<String>,
}

impl PromWriter {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes one counter sample (`name` should end in `_total`).
    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: u64) {
        self.header(name, help, "counter");
        self.sample(name, labels, None, &value.to_string());
    }

    /// Writes one gauge sample; `value` is an `i64`, `u32`, `u64` or `f64`.
    pub fn gauge(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        value: impl Into<GaugeValue>,
    ) {
        self.header(name, help, "gauge");
        let text = match value.into() {
            GaugeValue::Int(v) => v.to_string(),
            GaugeValue::Float(v) => float(v),
        };
        self.sample(name, labels, None, &text);
    }

    /// Writes one histogram: a `_bucket` line per upper bound (seconds), the
    /// `+Inf` bucket (= `count`), `_sum` and `_count`. Missing counts are
    /// taken as no further observations.
    #[allow(clippy::too_many_arguments)]
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        bucket_upper_bounds_seconds: &[f64],
        counts: BucketCounts<'_>,
        sum_seconds: f64,
        count: u64,
    ) {
        self.header(name, help, "histogram");
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (i, bound) in bucket_upper_bounds_seconds.iter().enumerate() {
            cumulative = match counts {
                BucketCounts::Cumulative(c) => c.get(i).copied().unwrap_or(cumulative),
                BucketCounts::PerBucket(c) => {
                    cumulative.saturating_add(c.get(i).copied().unwrap_or(0))
                }
            };
            let le = float(*bound);
            self.sample(&bucket, labels, Some(&le), &cumulative.to_string());
        }
        self.sample(&bucket, labels, Some("+Inf"), &count.to_string());
        self.sample(&format!("{name}_sum"), labels, None, &float(sum_seconds));
        self.sample(&format!("{name}_count"), labels, None, &count.to_string());
    }

    /// The exposition so far.
    pub fn as_str(&self) -> &str {
        &self.out
    }

    /// The finished exposition.
    pub fn finish(self) -> String {
        self.out
    }

    fn header(&mut self, name: &str, help: &str, kind: &str) {
        if self.families.insert(name.to_owned()) {
            let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
            let _ = writeln!(self.out, "# TYPE {name} {kind}");
        }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], le: Option<&str>, value: &str) {
        self.out.push_str(name);
        if !labels.is_empty() || le.is_some() {
            self.out.push('{');
            let extra = le.map(|v| ("le", v));
            for (i, (k, v)) in labels.iter().copied().chain(extra).enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        self.out.push(' ');
        self.out.push_str(value);
        self.out.push('\n');
    }
}

/// A float as Prometheus spells it (`+Inf`, `-Inf`, `NaN`, else shortest
/// round-trip decimal).
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        v.to_string()
    }
}

/// Label values escape backslash, double quote and newline.
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Help text escapes backslash and newline.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_with_one_header_per_family() {
        let mut w = PromWriter::new();
        w.counter("gw_accepted_total", "Connections accepted.", &[], 7);
        w.gauge("gw_active", "Open now.", &[("worker", "0")], 3i64);
        w.gauge("gw_active", "Open now.", &[("worker", "1")], -2i64);
        w.gauge("gw_ratio", "A ratio.\nSecond line \\ here", &[], 0.25);
        w.gauge("gw_inf", "Inf.", &[], f64::INFINITY);
        w.gauge("gw_big", "Big.", &[], u64::MAX);
        let expected = "\
# HELP gw_accepted_total Connections accepted.
# TYPE gw_accepted_total counter
gw_accepted_total 7
# HELP gw_active Open now.
# TYPE gw_active gauge
gw_active{worker=\"0\"} 3
gw_active{worker=\"1\"} -2
# HELP gw_ratio A ratio.\\nSecond line \\\\ here
# TYPE gw_ratio gauge
gw_ratio 0.25
# HELP gw_inf Inf.
# TYPE gw_inf gauge
gw_inf +Inf
# HELP gw_big Big.
# TYPE gw_big gauge
gw_big 18446744073709552000
";
        assert_eq!(w.finish(), expected);
    }

    #[test]
    fn label_values_are_escaped() {
        let mut w = PromWriter::new();
        w.counter("x_total", "h", &[("name", "a\\b\"c\nd"), ("sni", "ok")], 1);
        assert_eq!(
            w.as_str().lines().nth(2),
            Some("x_total{name=\"a\\\\b\\\"c\\nd\",sni=\"ok\"} 1")
        );
    }

    #[test]
    fn histogram_per_bucket_counts_become_cumulative_with_inf() {
        let mut w = PromWriter::new();
        w.histogram(
            "gw_handshake_seconds",
            "Handshake time.",
            &[("listener", "main")],
            &[0.001, 0.01, 1.0],
            BucketCounts::PerBucket(&[2, 3, 0, 4]),
            0.5,
            9,
        );
        let expected = "\
# HELP gw_handshake_seconds Handshake time.
# TYPE gw_handshake_seconds histogram
gw_handshake_seconds_bucket{listener=\"main\",le=\"0.001\"} 2
gw_handshake_seconds_bucket{listener=\"main\",le=\"0.01\"} 5
gw_handshake_seconds_bucket{listener=\"main\",le=\"1\"} 5
gw_handshake_seconds_bucket{listener=\"main\",le=\"+Inf\"} 9
gw_handshake_seconds_sum{listener=\"main\"} 0.5
gw_handshake_seconds_count{listener=\"main\"} 9
";
        assert_eq!(w.finish(), expected);
    }

    #[test]
    fn histogram_cumulative_counts_pass_through_and_header_once() {
        let mut w = PromWriter::new();
        for (lbl, n) in [("a", 1u64), ("b", 4)] {
            w.histogram(
                "h_seconds",
                "H.",
                &[("k", lbl)],
                &[0.5, 2.0],
                BucketCounts::Cumulative(&[n, n]),
                1.5,
                n + 1,
            );
        }
        let expected = "\
# HELP h_seconds H.
# TYPE h_seconds histogram
h_seconds_bucket{k=\"a\",le=\"0.5\"} 1
h_seconds_bucket{k=\"a\",le=\"2\"} 1
h_seconds_bucket{k=\"a\",le=\"+Inf\"} 2
h_seconds_sum{k=\"a\"} 1.5
h_seconds_count{k=\"a\"} 2
h_seconds_bucket{k=\"b\",le=\"0.5\"} 4
h_seconds_bucket{k=\"b\",le=\"2\"} 4
h_seconds_bucket{k=\"b\",le=\"+Inf\"} 5
h_seconds_sum{k=\"b\"} 1.5
h_seconds_count{k=\"b\"} 5
";
        assert_eq!(w.finish(), expected);
    }

    #[test]
    fn histogram_without_labels_has_only_le() {
        let mut w = PromWriter::new();
        w.histogram("t", "T.", &[], &[0.1], BucketCounts::PerBucket(&[]), 0.0, 0);
        assert!(w.as_str().contains("t_bucket{le=\"0.1\"} 0\n"));
        assert!(w.as_str().contains("t_bucket{le=\"+Inf\"} 0\n"));
        assert!(w.as_str().contains("t_sum 0\n"));
    }
}
