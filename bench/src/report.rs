//! Statistics and the report: a table on stdout and `target/bench/*.json`.
//! Every row has vtpmd's numbers, then each reference swtpm's with its
//! ratio (vtpmd / that swtpm, p50).

use std::path::Path;
use std::time::Duration;

#[derive(Clone, Debug)]
pub(crate) struct Stat {
    pub(crate) median: f64,
    pub(crate) p99: f64,
    pub(crate) n: usize,
}

pub(crate) fn stat(mut v: Vec<f64>) -> Stat {
    if v.is_empty() {
        return Stat {
            median: f64::NAN,
            p99: f64::NAN,
            n: 0,
        };
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    Stat {
        median: at(0.5),
        p99: at(0.99),
        n: v.len(),
    }
}

/// One number, shown as both p50 and p99.
pub(crate) fn one(x: f64) -> Stat {
    stat(vec![x])
}

pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) unit: &'static str,
    pub(crate) vtpmd: Stat,
    /// One entry per reference swtpm, in the order of `Opts::anchors`.
    pub(crate) refs: Vec<Stat>,
    pub(crate) extra: Vec<(String, Stat)>,
}

pub(crate) fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn ratio(v: &Stat, r: &Stat) -> f64 {
    v.median / r.median
}

fn num(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else if x.is_infinite() {
        "inf".into()
    } else {
        format!("{x:.1}")
    }
}

fn json_num(x: f64) -> serde_json::Value {
    if x.is_finite() {
        x.into()
    } else {
        serde_json::Value::Null
    }
}

pub(crate) fn report(rows: &[Row], anchors: &[String], root: &Path, smoke: bool) {
    println!();
    let mut head = format!(
        "{:<56} {:>5} {:>10} {:>10}",
        "row", "unit", "vtpmd p50", "vtpmd p99"
    );
    for a in anchors {
        let short = a.trim_start_matches("swtpm ");
        head += &format!(
            " | {:>10} {:>10} {:>7}",
            format!("{short} p50"),
            format!("{short} p99"),
            "ratio"
        );
    }
    println!("{head}  other (p50)");
    let mut json = Vec::new();
    for r in rows {
        let mut line = format!(
            "{:<56} {:>5} {:>10} {:>10}",
            r.name,
            r.unit,
            num(r.vtpmd.median),
            num(r.vtpmd.p99)
        );
        let mut row = serde_json::json!({
            "row": r.name, "unit": r.unit, "iterations": r.vtpmd.n,
            "vtpmd": {"median": json_num(r.vtpmd.median), "p99": json_num(r.vtpmd.p99)},
        });
        let mut ratios = serde_json::Map::new();
        for (a, s) in anchors.iter().zip(&r.refs) {
            let q = ratio(&r.vtpmd, s);
            line += &format!(
                " | {:>10} {:>10} {:>7}",
                num(s.median),
                num(s.p99),
                if q.is_finite() {
                    format!("{q:.2}")
                } else {
                    num(q)
                }
            );
            row[a.as_str()] = serde_json::json!({
                "median": json_num(s.median), "p99": json_num(s.p99), "iterations": s.n,
            });
            ratios.insert(a.clone(), json_num(q));
        }
        row["ratio_vtpmd_over"] = ratios.into();
        let extra: Vec<String> = r
            .extra
            .iter()
            .map(|(k, s)| format!("{k} {}", num(s.median)))
            .collect();
        println!("{line}  {}", extra.join(", "));
        for (k, s) in &r.extra {
            row[k.as_str()] =
                serde_json::json!({"median": json_num(s.median), "p99": json_num(s.p99)});
            if k == "in-process" {
                row["vtpmd_overhead_us"] = json_num(r.vtpmd.median - s.median);
            }
        }
        json.push(row);
    }
    let dir = root.join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(if smoke {
        "report-smoke.json"
    } else if std::env::var_os("VTPM_BENCH_ONLY").is_some() {
        "report-partial.json"
    } else {
        "report.json"
    });
    let doc = serde_json::json!({ "references": anchors, "rows": json });
    std::fs::write(&file, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    println!("\nreport: {}", file.display());
}
