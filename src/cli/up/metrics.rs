//! Reading the sidecars' Prometheus/OpenMetrics text: just enough of the
//! format for our own exporters (no exemplars, no timestamps we need).

/// One sample line: `name{k="v",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether every `(key, value)` in `want` is one of this sample's labels.
    pub fn has(&self, want: &[(&str, &str)]) -> bool {
        want.iter().all(|(k, v)| self.label(k) == Some(v))
    }
}

/// Every sample in `text`; comment lines and lines we cannot read are
/// skipped (a scrape is a best-effort view, never a reason to stop).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let (labels, after) = parse_labels(&line[open + 1..])?;
            (&line[..open], labels, after)
        }
        None => {
            let sp = line.find(' ')?;
            (&line[..sp], Vec::new(), &line[sp..])
        }
    };
    // `value [timestamp]`
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` and returns the labels and what follows `}`.
fn parse_labels(s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_string();
        let quoted = rest[eq + 1..].strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = quoted.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.push((key, value));
        rest = &quoted[end + 1..];
    }
}

/// The `q` quantile (0..1) of a histogram given as `(upper bound, count in
/// the bucket or below)` pairs, interpolated linearly inside the bucket the
/// way Prometheus' `histogram_quantile` does. None without observations.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let mut b: Vec<(f64, f64)> = buckets.to_vec();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    let total = b.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, cum) in &b {
        if cum >= rank {
            if le.is_infinite() {
                // Beyond the last finite bound: the best we can say.
                return Some(lower.0);
            }
            let in_bucket = cum - lower.1;
            let frac = if in_bucket > 0.0 {
                (rank - lower.1) / in_bucket
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * frac);
        }
        lower = (le, cum);
    }
    Some(lower.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_values_and_skips_comments() {
        let text = "# TYPE x counter\nbulwark_requests_total{direction=\"inbound\",src_identity=\"spiffe://td/ns/default/sa/web\",code=\"200\"} 12\nbulwark_xds_nacks_total 0\nh_bucket{le=\"+Inf\"} 3\n# EOF\n";
        let s = parse(text);
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[0].label("src_identity"),
            Some("spiffe://td/ns/default/sa/web")
        );
        assert_eq!(s[0].value, 12.0);
        assert_eq!(s[1].name, "bulwark_xds_nacks_total");
        assert_eq!(s[2].label("le"), Some("+Inf"));
    }

    #[test]
    fn quantile_interpolates_inside_the_bucket() {
        let b = [
            (0.001, 0.0),
            (0.002, 50.0),
            (0.004, 100.0),
            (f64::INFINITY, 100.0),
        ];
        let p50 = quantile(&b, 0.5).unwrap();
        assert!((p50 - 0.002).abs() < 1e-9, "{p50}");
        let p75 = quantile(&b, 0.75).unwrap();
        assert!((p75 - 0.003).abs() < 1e-9, "{p75}");
        assert_eq!(quantile(&[(f64::INFINITY, 0.0)], 0.5), None);
    }
}
